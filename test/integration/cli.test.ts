import { existsSync } from 'node:fs'
import { mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import { describe, expect, it, onTestFinished } from 'vitest'
import { goTime } from '../../src/cli/commands/inspect.js'
import { digestHex, digestOf } from '../../src/digest.js'
import { type SampleImage, writeSampleImage } from '../../src/sample-image.js'
import { parseImageName } from '../../src/transports/index.js'
import { cli } from '../helpers/cli.js'
import { writeRandomImage, writeRandomIndex } from '../helpers/random-image.js'
import { peer } from '../helpers/peers.js'
import { skopeoInspect } from '../helpers/skopeo.js'

async function tempDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'blobcache-cli-'))
  onTestFinished(() => rm(dir, { recursive: true, force: true }))
  return dir
}

/** A temp dir holding the sample image as `oci:<dir>/src:latest`. */
async function withSample(): Promise<{ dir: string; src: string; sample: SampleImage }> {
  const dir = await tempDir()
  const src = `oci:${dir}/src:latest`
  const sample = await writeSampleImage(parseImageName(src))
  return { dir, src, sample }
}

const blobBytes = (s: SampleImage) => s.layers.reduce((n, l) => n + l.size, 0) + s.config.size

describe('blobcache copy', () => {
  it('copies oci to dir with exit 0, skopeo-style lines and the same manifest digest', async () => {
    const { dir, src, sample } = await withSample()
    const r = await cli(['copy', src, `dir:${dir}/out`])
    expect(r.stderr).toBe('')
    expect(r.code).toBe(0)
    const manifest = await readFile(join(dir, 'out', 'manifest.json'))
    expect(digestOf(manifest)).toBe(sample.digest)
    const lines = r.stdout.trimEnd().split('\n')
    for (const l of sample.layers) expect(lines).toContain(`Copying blob ${l.digest} done`)
    expect(lines).toContain(`Copying config ${sample.config.digest} done`)
    expect(lines.at(-1)).toBe('Writing manifest to image destination')
  })

  it('prints one JSON summary with --json and counts copied and reused blobs', async () => {
    const { dir, src, sample } = await withSample()
    const first = await cli(['copy', '--json', src, `oci:${dir}/dest:one`])
    expect(first.code).toBe(0)
    const a = JSON.parse(first.stdout)
    expect(a).toEqual({
      manifestDigest: sample.digest,
      mediaType: 'application/vnd.oci.image.manifest.v1+json',
      blobs: { copied: sample.layers.length + 1, reused: 0 },
      bytes: blobBytes(sample),
      present: [],
    })
    // the same layout under another tag already holds every blob
    const second = await cli(['copy', '--json', src, `oci:${dir}/dest:two`])
    expect(second.code).toBe(0)
    const b = JSON.parse(second.stdout)
    expect(b.manifestDigest).toBe(sample.digest)
    expect(b.blobs).toEqual({ copied: 0, reused: sample.layers.length + 1 })
    expect(b.bytes).toBe(0)
  })

  it('recompresses with --dest-compress-format zstd and says nothing with -q', async () => {
    const { dir, src, sample } = await withSample()
    const r = await cli(['copy', '-q', '--dest-compress-format', 'zstd', src, `oci:${dir}/z:latest`])
    expect(r.code).toBe(0)
    expect(r.stdout).toBe('')
    const raw = await cli(['inspect', '--raw', `oci:${dir}/z:latest`])
    const manifest = JSON.parse(raw.stdout)
    expect(manifest.layers.map((l: { mediaType: string }) => l.mediaType)).toEqual(
      sample.layers.map(() => 'application/vnd.oci.image.layer.v1.tar+zstd'),
    )
    expect(digestOf(raw.out.bytes)).not.toBe(sample.digest)
  })

  it('draws progress bars when io.isTTY and still finishes with the manifest line', async () => {
    const { dir, src } = await withSample()
    const r = await cli(['copy', src, `dir:${dir}/tty`], { isTTY: true })
    expect(r.code).toBe(0)
    expect(r.stdout).toContain('Writing manifest to image destination')
  })

  it('draws one bar per blob (digest, bar, bytes, status) on a TTY', async () => {
    const { dir, src, sample } = await withSample()
    const r = await cli(['copy', src, `dir:${dir}/bars`], { isTTY: true })
    expect(r.code).toBe(0)
    const bar = (label: string, digest: string) =>
      new RegExp(`Copying ${label} +${digest.slice(7, 19)} \\[=+\\] .*done`)
    for (const l of sample.layers) expect(r.stdout).toMatch(bar('blob', l.digest))
    expect(r.stdout).toMatch(bar('config', sample.config.digest))
    // no skopeo-style plain lines on a TTY
    expect(r.stdout).not.toContain(`Copying blob ${sample.layers[0].digest} done`)
  })

  it('--all, --platform, --dest-compress, --dest-decompress and --format take effect', async () => {
    const dir = await tempDir()
    const ix = await writeRandomIndex(parseImageName(`dir:${dir}/index`), [
      { os: 'linux', architecture: 'amd64' }, { os: 'linux', architecture: 'arm64' },
    ], { compression: null })
    const all = JSON.parse((await cli(['copy', '--json', '--all', `dir:${dir}/index`, `oci:${dir}/all:x`])).stdout)
    expect(all).toMatchObject({ manifestDigest: ix.indexDigest, mediaType: 'application/vnd.oci.image.index.v1+json' })
    const arm = JSON.parse((await cli(['copy', '--json', '--platform', 'linux/arm64', `dir:${dir}/index`, `dir:${dir}/arm`])).stdout)
    expect(arm.manifestDigest).toBe(ix.images[1].manifestDigest)

    const gz = await cli(['copy', '-q', '--dest-compress', `dir:${dir}/arm`, `oci:${dir}/gz:x`])
    expect(gz.code).toBe(0)
    const gzManifest = JSON.parse((await cli(['inspect', '--raw', `oci:${dir}/gz:x`])).stdout)
    expect(gzManifest.layers.map((l: { mediaType: string }) => l.mediaType)).toEqual(
      ix.images[1].layers.map(() => 'application/vnd.oci.image.layer.v1.tar+gzip'),
    )
    expect((await cli(['copy', '-q', '--dest-decompress', `oci:${dir}/gz:x`, `dir:${dir}/plain`])).code).toBe(0)
    const plain = JSON.parse(await readFile(join(dir, 'plain', 'manifest.json'), 'utf8'))
    expect(plain.layers.map((l: { digest: string; mediaType: string }) => [l.digest, l.mediaType])).toEqual(
      ix.images[1].layers.map((l) => [l.diffID, 'application/vnd.oci.image.layer.v1.tar']),
    )
    const v2 = JSON.parse((await cli(['copy', '--json', '--format', 'v2s2', `oci:${dir}/gz:x`, `dir:${dir}/v2`])).stdout)
    expect(v2.mediaType).toBe('application/vnd.docker.distribution.manifest.v2+json')
    const v2Manifest = JSON.parse(await readFile(join(dir, 'v2', 'manifest.json'), 'utf8'))
    expect(v2Manifest.layers.map((l: { digest: string }) => l.digest)).toEqual(gzManifest.layers.map((l: { digest: string }) => l.digest))
  })

  it('--preserve-digests and --remove-signatures: refusals exit 1 naming the image, and the flags work', async () => {
    const dir = await tempDir()
    const image = await writeRandomImage(parseImageName(`dir:${dir}/signed`), { compression: null })
    await writeFile(join(dir, 'signed', 'signature-1'), 'a signature')
    // a signed image: copying it to oci: (which stores no signatures) is refused ...
    const refused = await cli(['copy', `dir:${dir}/signed`, `oci:${dir}/o:x`])
    expect(refused.code).toBe(1)
    expect(refused.stderr).toMatch(new RegExp(`^blobcache: copying dir:${dir}/signed to oci:${dir}/o:x: .*remove-signatures.*\\n$`))
    // ... unless told to drop them; dir: keeps them
    expect((await cli(['copy', '-q', '--remove-signatures', `dir:${dir}/signed`, `oci:${dir}/o:x`])).code).toBe(0)
    expect((await cli(['copy', '-q', `dir:${dir}/signed`, `dir:${dir}/copy`])).code).toBe(0)
    expect(await readFile(join(dir, 'copy', 'signature-1'), 'utf8')).toBe('a signature')
    // --preserve-digests refuses a change and writes no manifest
    const keep = await cli(['copy', '--preserve-digests', '--dest-compress', `oci:${dir}/o:x`, `dir:${dir}/kept`])
    expect(keep.code).toBe(1)
    expect(keep.stderr).toMatch(/^blobcache: copying .*: cannot copy .* without changing its manifest digest .*compressed with gzip.*\n$/)
    expect(existsSync(join(dir, 'kept', 'manifest.json'))).toBe(false)
    const same = JSON.parse((await cli(['copy', '--json', '--preserve-digests', `oci:${dir}/o:x`, `dir:${dir}/same`])).stdout)
    expect(same.manifestDigest).toBe(image.manifestDigest)
  })

  it.each([
    [['copy', '--bogus', 'dir:/a', 'dir:/b'], /unknown option '--bogus'/],
    [['copy', 'dir:/a'], /missing required argument 'dest'/],
    [['copy', '--all', '--platform', 'linux/amd64', 'dir:/a', 'dir:/b'], /cannot be used with/],
    [['copy', '--dest-decompress', '--dest-compress-format', 'zstd', 'dir:/a', 'dir:/b'], /cannot be used with/],
    [['copy', '--dest-compress-format', 'lz4', 'dir:/a', 'dir:/b'], /Allowed choices are gzip, zstd/],
    [['copy', '--platform', 'linux', 'dir:/a', 'dir:/b'], /expected os\/arch/],
    [['copy', '--cache-compression', 'compress', 'dir:/a', 'dir:/b'], /need --blob-cache/],
    [['copy', 'dir:/a', 'dir:/b', 'dir:/c'], /too many arguments/],
    [['frobnicate'], /unknown command 'frobnicate'/],
  ])('exits 2 on the usage error %j', async (argv, message) => {
    const r = await cli(argv)
    expect(r.code).toBe(2)
    expect(r.stderr).toMatch(message)
    expect(r.stdout).toBe('')
  })

  it('exits 0 for --help and --version', async () => {
    const help = await cli(['copy', '--help'])
    expect(help.code).toBe(0)
    expect(help.stdout).toContain('--blob-cache <dir>')
    const version = await cli(['--version'])
    expect(version.code).toBe(0)
    expect(version.stdout).toMatch(/^\d+\.\d+\.\d+/)
  })

  it('exits 1 with one stderr line naming the image when the source is missing', async () => {
    const dir = await tempDir()
    const src = `oci:${dir}/missing:latest`
    const r = await cli(['copy', src, `dir:${dir}/out`])
    expect(r.code).toBe(1)
    const lines = r.stderr.split('\n').filter(Boolean)
    expect(lines).toHaveLength(1)
    expect(lines[0]).toMatch(new RegExp(`^blobcache: copying ${src} to dir:${dir}/out: \\S`))
    expect(existsSync(join(dir, 'out', 'manifest.json'))).toBe(false)
  })

  it('exits 1 naming the image for an unknown transport', async () => {
    const r = await cli(['copy', 'nosuch:/x', 'dir:/tmp/never'])
    expect(r.code).toBe(1)
    expect(r.stderr).toMatch(/^blobcache: copying nosuch:\/x to dir:\/tmp\/never: .+\n$/)
  })

  it('aborts the run on SIGINT and removes its listener afterwards', async () => {
    const { dir, src } = await withSample()
    const before = process.listenerCount('SIGINT')
    const running = cli(['copy', src, `dir:${dir}/int`])
    process.emit('SIGINT')
    const r = await running
    expect(r.code).toBe(1)
    expect(r.stderr).toMatch(/interrupted/)
    expect(r.stderr.trimEnd().split('\n').at(-1)).toMatch(/^blobcache: copying .*: interrupted$/)
    expect(process.listenerCount('SIGINT')).toBe(before)
  })
})

describe('blobcache inspect', () => {
  it('--raw prints the manifest bytes exactly', async () => {
    const { src, sample } = await withSample()
    const r = await cli(['inspect', '--raw', src])
    expect(r.code).toBe(0)
    expect(r.out.bytes.equals(sample.manifest)).toBe(true)
  })

  it('prints a skopeo-style summary by default', async () => {
    const { src, sample } = await withSample()
    const r = await cli(['inspect', src])
    expect(r.code).toBe(0)
    const info = JSON.parse(r.stdout)
    expect(Object.keys(info).filter((k) => k !== 'Name' && k !== 'Variant')).toEqual([
      'Digest', 'RepoTags', 'Created', 'DockerVersion', 'Labels', 'Architecture', 'Os', 'Layers', 'LayersData', 'Env',
    ])
    expect(info.Digest).toBe(sample.digest)
    expect(info.Layers).toEqual(sample.layers.map((l) => l.digest))
    expect(info.LayersData).toEqual(
      sample.layers.map((l) => ({ MIMEType: l.mediaType, Digest: l.digest, Size: l.size, Annotations: null })),
    )
    expect(info.Os).toBe('linux')
    expect(info.Labels).toEqual({ 'org.opencontainers.image.title': 'blobcache sample' })
  })

  it('--config prints the config, and --raw --config its exact bytes', async () => {
    const { src, sample } = await withSample()
    const raw = await cli(['inspect', '--raw', '--config', src])
    expect(raw.code).toBe(0)
    expect(digestOf(raw.out.bytes)).toBe(sample.config.digest)
    const pretty = await cli(['inspect', '--config', src])
    expect(JSON.parse(pretty.stdout)).toEqual(JSON.parse(raw.stdout))
  })

  it('exits 1 naming the image when it is missing', async () => {
    const dir = await tempDir()
    const r = await cli(['inspect', `oci:${dir}/nothing:latest`])
    expect(r.code).toBe(1)
    expect(r.stderr).toMatch(new RegExp(`^blobcache: inspecting oci:${dir}/nothing:latest: .+\\n$`))
  })

  const skopeo = peer('skopeo')
  it.skipIf(!skopeo)('agrees with skopeo inspect on every field (oci and docker-archive)', async () => {
    const { dir, src } = await withSample()
    const archive = `docker-archive:${dir}/image.tar:demo/sample:latest`
    expect((await cli(['copy', '-q', src, archive])).code).toBe(0)
    for (const name of [src, archive]) {
      const ours = JSON.parse((await cli(['inspect', name])).stdout)
      const theirs = await skopeoInspect(name)
      if (name === archive) {
        // skopeo 1.9's docker-archive source labels its uncompressed layers diff.tar.gzip in the
        // manifest it makes up, so that manifest (and its digest) differs from ours (diff.tar).
        for (const l of ours.LayersData) expect(l.MIMEType).toBe('application/vnd.docker.image.rootfs.diff.tar')
        for (const info of [ours, theirs]) {
          delete info.Digest
          for (const l of info.LayersData ?? []) delete l.MIMEType
        }
      }
      for (const key of Object.keys(theirs)) expect(ours[key], `${name} ${key}`).toEqual(theirs[key])
      const order = Object.keys(ours)
      expect(Object.keys(theirs)).toEqual(order.filter((k) => k in theirs))
    }
  })

  it('prints created times the way Go does', () => {
    expect(goTime('2024-01-01T00:00:00.000Z')).toBe('2024-01-01T00:00:00Z')
    expect(goTime('2026-11-22T10:33:13.593134085Z')).toBe('2026-11-22T10:33:13.593134085Z')
    expect(goTime('2024-01-01T10:00:00.5+00:00')).toBe('2024-01-01T10:00:00.5Z')
    expect(goTime('2024-01-01T10:00:00+02:00')).toBe('2024-01-01T10:00:00+02:00')
  })
})

describe('blobcache copy --blob-cache and blobcache cache', () => {
  it('fills the cache, then serves a copy whose source lost its blobs', async () => {
    const { dir, src, sample } = await withSample()
    const cache = join(dir, 'cache', 'nested')
    const cold = await cli(['copy', '--json', '--blob-cache', cache, src, `oci:${dir}/cold:latest`])
    expect(cold.stderr).toBe('')
    expect(cold.code).toBe(0)
    const a = JSON.parse(cold.stdout)
    expect(a.manifestDigest).toBe(sample.digest)
    expect(a.cache).toMatchObject({ hits: 0, errors: 0 })
    const names = await readdir(cache)
    for (const l of sample.layers) expect(names).toContain(l.digest)

    for (const d of [...sample.layers, sample.config]) await rm(join(dir, 'src', 'blobs', 'sha256', digestHex(d.digest)))
    const warm = await cli(['copy', '--json', '--blob-cache', cache, src, `dir:${dir}/warm`])
    expect(warm.stderr).toBe('')
    expect(warm.code).toBe(0)
    const b = JSON.parse(warm.stdout)
    expect(b.manifestDigest).toBe(sample.digest)
    expect(b.cache.hits).toBeGreaterThanOrEqual(sample.layers.length + 1)
    expect(digestOf(await readFile(join(dir, 'warm', 'manifest.json')))).toBe(sample.digest)
  })

  it('--cache-compression decompress and compress --cache-compress-format zstd substitute cached variants', async () => {
    const { dir, src, sample } = await withSample()
    const cache = join(dir, 'cache')
    const cold = JSON.parse((await cli(['copy', '--json', '--blob-cache', cache, src, `dir:${dir}/cold`])).stdout)
    expect(Object.keys(cold.cache).sort()).toEqual(['errors', 'hits', 'misses'])
    expect(cold.cache).toMatchObject({ hits: 0, errors: 0 })
    expect(cold.cache.misses).toBeGreaterThan(0)
    // the gzip layers were decompressed into the cache on the way: decompress mode serves those
    const plain = await cli(['copy', '--json', '--blob-cache', cache, '--cache-compression', 'decompress', src, `dir:${dir}/plain`])
    expect(plain.code).toBe(0)
    const plainManifest = JSON.parse(await readFile(join(dir, 'plain', 'manifest.json'), 'utf8'))
    expect(plainManifest.layers.map((l: { mediaType: string }) => l.mediaType)).toEqual(
      sample.layers.map(() => 'application/vnd.oci.image.layer.v1.tar'),
    )
    expect(JSON.parse(plain.stdout).cache.hits).toBeGreaterThanOrEqual(sample.layers.length)
    for (const l of plainManifest.layers) expect(digestOf(await readFile(join(dir, 'plain', digestHex(l.digest))))).toBe(l.digest)

    // an uncompressed image through a compress/zstd cache: the write makes zstd variants, the
    // next read substitutes them
    const z = ['--blob-cache', cache, '--cache-compression', 'compress', '--cache-compress-format', 'zstd']
    expect((await cli(['copy', '-q', ...z, `dir:${dir}/plain`, `dir:${dir}/plain2`])).code).toBe(0)
    const zr = await cli(['copy', '--json', ...z, `dir:${dir}/plain`, `dir:${dir}/zstd`])
    expect(zr.code).toBe(0)
    const zManifest = JSON.parse(await readFile(join(dir, 'zstd', 'manifest.json'), 'utf8'))
    expect(zManifest.layers.map((l: { mediaType: string }) => l.mediaType)).toEqual(
      sample.layers.map(() => 'application/vnd.oci.image.layer.v1.tar+zstd'),
    )
    for (const l of zManifest.layers) {
      const bytes = await readFile(join(dir, 'zstd', digestHex(l.digest)))
      expect(digestOf(bytes)).toBe(l.digest)
      expect(bytes.readUInt32LE(0)).toBe(0xfd2fb528) // zstd frame magic
    }
  })

  it('cache verify removes a corrupt entry and says so', async () => {
    const { dir, src, sample } = await withSample()
    const cache = join(dir, 'cache')
    expect((await cli(['copy', '-q', '--blob-cache', cache, src, `dir:${dir}/out`])).code).toBe(0)
    const victim = sample.layers[1].digest
    const bytes = await readFile(join(cache, victim))
    bytes[bytes.length - 1] ^= 0xff
    await writeFile(join(cache, victim), bytes)
    const verify = await cli(['cache', 'verify', '--json', cache])
    expect(verify.code).toBe(0)
    expect(JSON.parse(verify.stdout).removed).toEqual([victim])
    expect((await cli(['cache', 'has', cache, victim])).code).toBe(1)
    const text = await cli(['cache', 'verify', cache])
    expect(text.code).toBe(0)
    expect(text.stdout).not.toBe('')
  })

  it('ls, has, verify, prune and clear work on the directory', async () => {
    const { dir, src, sample } = await withSample()
    const cache = join(dir, 'cache')
    expect((await cli(['copy', '-q', '--blob-cache', cache, src, `oci:${dir}/c:latest`])).code).toBe(0)

    const ls = await cli(['cache', 'ls', '--json', cache])
    expect(ls.code).toBe(0)
    const entries = JSON.parse(ls.stdout) as { name: string; kind: string; size: number }[]
    for (const l of sample.layers) expect(entries).toContainEqual(expect.objectContaining({ name: l.digest, kind: 'blob', size: l.size }))
    expect((await cli(['cache', 'ls', cache])).stdout).toMatch(/\d+ entries, /)

    const layer = sample.layers[0].digest
    const has = await cli(['cache', 'has', cache, layer])
    expect(has).toMatchObject({ code: 0, stdout: `${layer} present ${sample.layers[0].size}\n` })
    const absent = digestOf('not in the cache')
    const hasJson = await cli(['cache', 'has', '--json', cache, layer, absent])
    expect(hasJson.code).toBe(1)
    expect(JSON.parse(hasJson.stdout)).toEqual([
      { digest: layer, present: true, size: sample.layers[0].size },
      { digest: absent, present: false },
    ])
    expect((await cli(['cache', 'has', cache, 'sha256:nothex'])).code).toBe(2)

    const verify = await cli(['cache', 'verify', '--json', cache])
    expect(verify.code).toBe(0)
    expect(JSON.parse(verify.stdout)).toMatchObject({ removed: [] })
    expect(JSON.parse(verify.stdout).checked).toBeGreaterThanOrEqual(sample.layers.length)

    const keep = await cli(['cache', 'prune', '--json', '--older-than', '7d', cache])
    expect(keep.code).toBe(0)
    expect(JSON.parse(keep.stdout)).toMatchObject({ removed: [], freedBytes: 0 })
    const prune = await cli(['cache', 'prune', '--json', '--max-size', '0', cache])
    expect(prune.code).toBe(0)
    const report = JSON.parse(prune.stdout)
    expect(report.keptBytes).toBe(0)
    expect(report.removed).toEqual(expect.arrayContaining(sample.layers.map((l) => l.digest)))
    expect((await cli(['cache', 'has', cache, layer])).code).toBe(1)
    expect((await cli(['cache', 'prune', '--max-size', 'lots', cache])).code).toBe(2)

    expect((await cli(['copy', '-q', '--blob-cache', cache, src, `oci:${dir}/c:again`])).code).toBe(0)
    const clear = await cli(['cache', 'clear', cache])
    expect(clear.code).toBe(0)
    expect(await readdir(cache)).toEqual([])
  })
})
