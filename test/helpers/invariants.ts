// Checks of what must hold on disk whatever happened before (a SIGKILL, a full disk, a flaky
// registry, hostile input): every file named by a digest hashes to its name, every index.json
// parses, and no layout names an image it does not fully hold. Each check returns what it found
// instead of asserting, so that tests and the soak can count damage as well as fail on it.
import { createHash } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { lstat, readFile, readdir } from 'node:fs/promises'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { parseCompressedNote } from '../../src/blobcache/index.js'
import { decompressStream, detectCompression } from '../../src/compression.js'
import { type Digest, digestHex, digestOf, isDigest } from '../../src/digest.js'
import { type Descriptor, parseManifest } from '../../src/manifest.js'
import { isManifestMediaType } from '../../src/media-types.js'
import type { ImageReference } from '../../src/types.js'
import { readAll } from './conformance.js'

/** One thing found wrong. */
export interface Damage {
  /** The file (or `dir:entry`) concerned. */
  path: string
  why: string
}

/** What a check looked at and found. */
export interface CheckReport {
  /** Files hashed. */
  hashed: number
  /** Temporary files (`.tmp-…`) and stale lock files left behind (not damage). */
  leftovers: string[]
  damage: Damage[]
}

/** The sha256/sha512 digest of a file, streamed. */
export async function fileDigest(path: string, algorithm = 'sha256'): Promise<string> {
  const hash = createHash(algorithm)
  await pipeline(createReadStream(path, { highWaterMark: 1 << 20 }), hash)
  return `${algorithm}:${hash.digest('hex')}`
}

const CACHE_NAME = /^((?:sha256:[0-9a-f]{64})|(?:sha512:[0-9a-f]{128}))(\.config|\.compressed|\.decompressed)?$/

/**
 * A blob-cache directory (containers/image layout): every `<digest>` and `<digest>.config` file
 * hashes to its digest, every `.decompressed` note holds one valid digest, every `.compressed`
 * note parses. With `complete`, notes must also point at entries that exist and name each other.
 */
export async function checkBlobCacheDir(dir: string, opts: { complete?: boolean } = {}): Promise<CheckReport> {
  const report: CheckReport = { hashed: 0, leftovers: [], damage: [] }
  const names = await readdir(dir).catch(() => [] as string[])
  const present = new Set(names)
  for (const name of names) {
    const path = join(dir, name)
    if (name.startsWith('.tmp-')) {
      report.leftovers.push(name)
      continue
    }
    const m = CACHE_NAME.exec(name)
    if (!m) {
      report.damage.push({ path, why: 'a file the cache does not name' })
      continue
    }
    const st = await lstat(path)
    if (!st.isFile()) {
      report.damage.push({ path, why: 'not a regular file' })
      continue
    }
    const digest = m[1]
    if (m[2] === undefined || m[2] === '.config') {
      const got = await fileDigest(path, digest.slice(0, digest.indexOf(':')))
      report.hashed++
      if (got !== digest) report.damage.push({ path, why: `hashes to ${got}` })
      continue
    }
    const text = await readFile(path, 'utf8')
    if (m[2] === '.decompressed') {
      if (!isDigest(text.trim())) report.damage.push({ path, why: `note holds ${JSON.stringify(text.slice(0, 80))}` })
      else if (opts.complete) {
        const u = text.trim()
        if (!present.has(u) && !present.has(`${u}.config`)) report.damage.push({ path, why: `names ${u}, which is not in the cache` })
        if (!present.has(`${u}.compressed`) && u !== digest) report.damage.push({ path, why: `${u} has no .compressed note` })
        else if (u !== digest) {
          const note = parseCompressedNote(await readFile(join(dir, `${u}.compressed`), 'utf8'))
          if (!note.has(digest as Digest)) report.damage.push({ path, why: `${u}.compressed does not list it` })
        }
      }
      continue
    }
    try {
      const note = parseCompressedNote(text)
      if (opts.complete) {
        for (const c of note.keys()) {
          if (!present.has(c)) report.damage.push({ path, why: `lists ${c}, which is not in the cache` })
        }
      }
    } catch (err) {
      report.damage.push({ path, why: `unparsable note: ${(err as Error).message}` })
    }
  }
  return report
}

/** Options of {@link checkLayoutDir}. */
export interface LayoutCheckOptions {
  /** An index may lack some of its instances (an image cache holds some platforms only). Default false. */
  partialIndexes?: boolean
  /** Extra files allowed at the top of the layout besides blobs/, index.json, oci-layout. */
  allowTop?: string[]
}

/** A layout check, plus the entries index.json lists. */
export interface LayoutReport extends CheckReport {
  entries: Descriptor[]
}

/**
 * An OCI layout: every `blobs/<alg>/<hex>` hashes to its name, index.json parses, and every
 * entry it lists is held whole (manifest, config, layers; an index's instances recursively).
 * A missing layout is empty, not damaged.
 */
export async function checkLayoutDir(dir: string, opts: LayoutCheckOptions = {}): Promise<LayoutReport> {
  const report: LayoutReport = { hashed: 0, leftovers: [], damage: [], entries: [] }
  const top = await readdir(dir).catch(() => undefined)
  if (top === undefined) return report
  const good = new Map<string, number>() // digest -> size, of blobs that hash to their name
  for (const alg of await readdir(join(dir, 'blobs')).catch(() => [] as string[])) {
    for (const name of await readdir(join(dir, 'blobs', alg))) {
      const path = join(dir, 'blobs', alg, name)
      if (name.startsWith('.tmp-')) {
        report.leftovers.push(`blobs/${alg}/${name}`)
        continue
      }
      const digest = `${alg}:${name}`
      if (!isDigest(digest)) {
        report.damage.push({ path, why: 'not named by a digest' })
        continue
      }
      const st = await lstat(path)
      if (!st.isFile()) {
        report.damage.push({ path, why: 'not a regular file' })
        continue
      }
      const got = await fileDigest(path, alg)
      report.hashed++
      if (got === digest) good.set(digest, st.size)
      else report.damage.push({ path, why: `hashes to ${got}` })
    }
  }
  for (const name of top) {
    if (name.startsWith('.tmp-') || name === 'index.json.lock' || name === 'index.json.lock.break') report.leftovers.push(name)
    else if (!['blobs', 'index.json', 'oci-layout', ...(opts.allowTop ?? [])].includes(name)) report.damage.push({ path: join(dir, name), why: 'unexpected file in the layout' })
  }
  if (!top.includes('index.json')) {
    // a first write killed before its commit: verified blobs that nothing names yet
    if (good.size) report.leftovers.push(`${good.size} blobs and no index.json yet`)
    return report
  }
  let index: { manifests?: unknown }
  try {
    index = JSON.parse(await readFile(join(dir, 'index.json'), 'utf8')) as { manifests?: unknown }
    if (!Array.isArray(index.manifests)) throw new Error('no manifests array')
  } catch (err) {
    report.damage.push({ path: join(dir, 'index.json'), why: `does not parse: ${(err as Error).message}` })
    return report
  }
  report.entries = index.manifests as Descriptor[]
  const held = (d: Descriptor) => good.get(d.digest) === d.size
  const visit = async (d: Descriptor, where: string, depth: number): Promise<void> => {
    if (!isDigest(d?.digest)) return void report.damage.push({ path: where, why: `entry with digest ${JSON.stringify(d?.digest)}` })
    if (!held(d)) return void report.damage.push({ path: where, why: `${d.digest} (${d.size} bytes) is not held whole` })
    if (!isManifestMediaType(d.mediaType) || depth > 4) return
    const bytes = await readFile(join(dir, 'blobs', d.digest.slice(0, d.digest.indexOf(':')), digestHex(d.digest)))
    let parsed
    try {
      parsed = parseManifest(bytes, d.mediaType)
    } catch (err) {
      return void report.damage.push({ path: where, why: `manifest ${d.digest} does not parse: ${(err as Error).message}` })
    }
    if (parsed.kind === 'index') {
      for (const [i, child] of parsed.index.manifests.entries()) {
        if (opts.partialIndexes && !good.has(child.digest)) continue
        await visit(child, `${where} > manifests[${i}]`, depth + 1)
      }
      return
    }
    for (const [i, blob] of [parsed.manifest.config, ...parsed.manifest.layers].entries()) {
      if (!held(blob)) report.damage.push({ path: `${where} > ${i === 0 ? 'config' : `layers[${i - 1}]`}`, why: `${blob.digest} (${blob.size} bytes) is not held whole` })
    }
  }
  for (const [i, d] of report.entries.entries()) await visit(d, `${dir}: index.json manifests[${i}]`, 0)
  return report
}

/** The names (`org.opencontainers.image.ref.name`) of the entries of a layout report. */
export function entryNames(report: LayoutReport): string[] {
  return report.entries.map((d) => d.annotations?.['org.opencontainers.image.ref.name']).filter((n): n is string => n !== undefined).sort()
}

/** Every path under `dir`, recursively (relative); [] when it does not exist. */
export async function treeOf(dir: string): Promise<string[]> {
  return ((await readdir(dir, { recursive: true }).catch(() => [] as string[])) as string[]).map(String).sort()
}

/** What an image holds, read back through any source: every blob hashed on the way. */
export interface ImageContent {
  manifestDigest: Digest
  /** The config's rootfs.diff_ids. */
  configDiffIDs: string[]
  /** The digests of the layers as read, decompressed. */
  diffIDs: Digest[]
}

/**
 * Reads the image `ref` names (an image manifest; for an index, the linux/amd64 instance) and
 * hashes every blob: each MUST match its descriptor, and each layer is decompressed and hashed,
 * so that the caller can compare the content with what was written.
 */
export async function imageContent(ref: ImageReference): Promise<ImageContent> {
  const src = await ref.newImageSource()
  try {
    let top = await src.getManifest()
    let parsed = parseManifest(top.bytes, top.mediaType)
    let manifestDigest = digestOf(top.bytes)
    if (parsed.kind === 'index') {
      const d = parsed.index.manifests.find((m) => m.platform?.architecture === 'amd64') ?? parsed.index.manifests[0]
      top = await src.getManifest(d.digest)
      manifestDigest = digestOf(top.bytes)
      parsed = parseManifest(top.bytes, top.mediaType)
    }
    if (parsed.kind !== 'image') throw new Error('nested index')
    const configBlob = await src.getBlob(parsed.manifest.config)
    const config = await readAll(configBlob.stream)
    if (digestOf(config) !== parsed.manifest.config.digest) throw new Error(`config does not hash to ${parsed.manifest.config.digest}`)
    const configDiffIDs = ((JSON.parse(config.toString()) as { rootfs?: { diff_ids?: string[] } }).rootfs?.diff_ids) ?? []
    const diffIDs: Digest[] = []
    for (const l of parsed.manifest.layers) {
      const blob = await readAll((await src.getBlob(l)).stream)
      if (digestOf(blob) !== l.digest || blob.length !== l.size) throw new Error(`layer does not match ${l.digest}`)
      const alg = detectCompression(blob.subarray(0, 16))
      diffIDs.push(digestOf(alg ? await readAll(Readable.from([blob]).pipe(decompressStream(alg))) : blob))
    }
    return { manifestDigest, configDiffIDs, diffIDs }
  } finally {
    await src.close()
  }
}
