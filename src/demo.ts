// `npm run demo`: builds a small sample image, copies it through every local transport with
// compression changes, then shows the blob cache filling up and serving a copy whose source
// has lost its blobs. Needs no setup and removes its temporary directory at the end.
import { mkdir, mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { BlobCache, CacheDirectory } from './blobcache/index.js'
import { formatBytes, formatDuration } from './cli/io.js'
import { shortDigest } from './cli/progress.js'
import { type CopyOptions, copyImage } from './copy.js'
import { digestHex } from './digest.js'
import { type SampleImage, writeSampleImage } from './sample-image.js'
import { parseImageName } from './transports/index.js'
import type { ImageReference } from './types.js'

const out = (line = '') => process.stdout.write(line + '\n')

const plural = (n: number, one: string, many = one + 's') => `${n} ${n === 1 ? one : many}`

/** A cache file name with its digest cut to 12 hex digits: `sha256:0123456789ab….config`. */
const shortName = (name: string) => name.replace(/^(sha(?:256|512):[0-9a-f]{12})[0-9a-f]+/, '$1…')

async function step(n: string, src: ImageReference, dest: ImageReference, show: (s: string) => string, opts: CopyOptions = {}) {
  const started = performance.now()
  const r = await copyImage(src, dest, opts)
  const ms = performance.now() - started
  const name = (ref: ImageReference) => show(`${ref.transport.name}:${ref.stringWithinTransport()}`)
  out(`${n} ${name(src)} -> ${name(dest)}`)
  out(`   ${shortDigest(r.digest)}  copied ${r.copied}, reused ${r.reused}, ${formatBytes(r.bytes)}, ${formatDuration(ms)}`)
  return r
}

async function run(root: string): Promise<void> {
  const show = (s: string) => s.split(root + '/').join('')
  const ref = (name: string) => parseImageName(name.replace('$', root + '/'))
  out(`blobcache demo, working in ${root}`)

  const sampleRef = ref('oci:$sample:latest')
  const sample: SampleImage = await writeSampleImage(sampleRef)
  const total = sample.layers.reduce((n, l) => n + l.size, 0)
  out(`sample image oci:sample:latest: ${sample.layers.length} gzip layers (${formatBytes(total)}) + config, ${shortDigest(sample.digest)}`)
  out()
  out('Copies across transports:')
  await step(' 1.', sampleRef, ref('dir:$image-dir'), show)
  await step(' 2.', ref('dir:$image-dir'), ref('oci-archive:$image.oci.tar:latest'), show)
  await step(' 3.', ref('oci-archive:$image.oci.tar:latest'), ref('docker-archive:$image.docker.tar:demo/sample:latest'), show)
  out('    (docker-archive holds Docker schema 2 and uncompressed layers: new digests)')
  await step(' 4.', ref('docker-archive:$image.docker.tar:demo/sample:latest'), ref('oci:$zstd:latest'), show, {
    compression: 'compress', compressionAlgorithm: 'zstd', manifestFormat: 'oci',
  })
  out('    (layers recompressed to zstd: new layer digests, new manifest)')
  const back = await step(' 5.', ref('oci:$zstd:latest'), ref('oci:$gzip:latest'), show, { compression: 'compress', compressionAlgorithm: 'gzip' })
  out(`    (back to gzip: ${back.digest === sample.digest ? 'the same bytes and digest as the sample' : 'other gzip bytes than the sample, so new digests'})`)
  out()
  const cacheDir = join(root, 'cache')
  await mkdir(cacheDir)
  out(`Blob cache in ${show(cacheDir)}:`)
  const cached = (name: string) => new BlobCache(ref(name), cacheDir, 'preserve')
  const coldSrc = cached('oci:$sample:latest')
  const coldDest = cached('oci:$cold:latest')
  await step(' 6.', coldSrc, coldDest, show)
  out(`    cold: ${plural(coldSrc.stats.hits, 'hit')}, ${plural(coldSrc.stats.misses + coldDest.stats.misses, 'miss', 'misses')}`)
  const entries = await new CacheDirectory(cacheDir).list()
  out(`    the cache now holds ${entries.length} files (blobs with their notes):`)
  for (const e of entries.filter((x) => x.kind === 'blob' || x.kind === 'config')) {
    const notes = entries.filter((n) => n.kind === 'note' && n.name.startsWith(e.name.replace(/\.config$/, '') + '.'))
    const suffix = notes.map((n) => n.name.slice(n.name.lastIndexOf('.'))).join(' ')
    out(`      ${e.kind.padEnd(6)} ${formatBytes(e.size).padStart(9)}  ${shortName(e.name)}${suffix ? `  + ${suffix}` : ''}`)
  }

  for (const d of [...sample.layers, sample.config]) await rm(join(root, 'sample', 'blobs', 'sha256', digestHex(d.digest)))
  out(`    deleted the ${sample.layers.length} layers and the config of oci:sample`)
  const warmSrc = cached('oci:$sample:latest')
  const warmDest = cached('oci:$warm:latest')
  const warm = await step(' 7.', warmSrc, warmDest, show)
  const hits = warmSrc.stats.hits + warmDest.stats.hits
  out(`    warm: ${plural(hits, 'hit')} from the cache, ${plural(warmSrc.stats.misses, 'miss', 'misses')} (the manifest, still in oci:sample)`)
  out(`    same image as the sample: ${warm.digest === sample.digest ? 'yes' : 'no'}`)
}

const root = await mkdtemp(join(tmpdir(), 'blobcache-demo-'))
try {
  await run(root)
  out()
  out(`removed ${root}`)
} catch (err) {
  process.stderr.write(`blobcache demo failed: ${err instanceof Error ? err.stack : String(err)}\n`)
  process.exitCode = 1
} finally {
  await rm(root, { recursive: true, force: true })
}
