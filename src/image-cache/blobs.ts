// Blobs of the image cache: `blobs/<alg>/<hex>`, written only through a verified `.tmp-` file
// and a rename, so a file under a digest name always holds those bytes (a crash leaves at most
// a temp file, which gc removes). Small JSON blobs are read whole and verified on every read.
import { randomBytes } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { mkdir, open, rename, rm, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { Readable, addAbortSignal, pipeline as pipelineStreams } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import debug from 'debug'
import { type Digest, checkDigest, digestAlgorithm, digestHex, digestOf, parseDigest, verifyDigest } from '../digest.js'
import { DigestMismatchError, ImageError, errnoCode } from '../errors.js'
import { type Descriptor, type ParsedManifest, parseManifest } from '../manifest.js'
import { isManifestMediaType } from '../media-types.js'
import { BlobFile } from '../io/blob-file.js'
import { drainInto } from '../io/blob-drain.js'

const log = debug('blobcache:image-cache:blobs')

/** Chunk size of file streams. */
export const CHUNK = 1 << 20
/** Largest manifest, index or config read into memory. */
export const MAX_SMALL_BLOB = 16 << 20

/** The path of a blob; the digest is validated before it becomes a path. */
export function blobPath(dir: string, digest: Digest): string {
  const d = parseDigest(digest)
  return join(dir, 'blobs', digestAlgorithm(d), digestHex(d))
}

/** The size of a blob file, or undefined when there is none. */
export async function blobSize(dir: string, digest: Digest): Promise<number | undefined> {
  try {
    const s = await stat(blobPath(dir, digest))
    return s.isFile() ? s.size : undefined
  } catch (err) {
    if (errnoCode(err) === 'ENOENT' || errnoCode(err) === 'ENOTDIR') return undefined
    throw err
  }
}

/** True when the blob of `d` is present with the descriptor's size. */
export async function hasBlob(dir: string, d: { digest: Digest; size: number }): Promise<boolean> {
  const size = await blobSize(dir, d.digest)
  return size !== undefined && (d.size < 0 || size === d.size)
}

/** Options of {@link writeBlob}. */
export interface WriteBlobOptions {
  /** The digest the bytes MUST hash to; without it the sha256 of the bytes names them. */
  expected?: Digest
  /** The exact byte count; -1 or undefined when unknown. */
  size?: number
  /** The stream is verified already (e.g. by the registry client): skip the hash here. */
  verified?: boolean
  /**
   * fsync the file before naming it. Default true. Small blobs that are hashed on every read
   * (manifests, configs) may skip it: a copy torn by a power loss is then found and replaced.
   */
  durable?: boolean
  signal?: AbortSignal
}

/**
 * Streams a blob into the cache: a `.tmp-` file beside its final name, hashed as it is written
 * (one pass, no intermediate streams, no copies; large blobs on the hashing thread: see
 * {@link BlobFile}), fsynced, then renamed over the final name (replacing a damaged copy). The
 * stream's chunks MUST NOT change once emitted. A wrong digest fails `DIGEST_INVALID`, a wrong
 * size `SIZE_INVALID`. On any failure or abort (rejecting with `signal.reason`) the temp file is
 * removed and nothing is named.
 */
export async function writeBlob(dir: string, stream: Readable, opts: WriteBlobOptions = {}): Promise<{ digest: Digest; size: number }> {
  const { signal } = opts
  if (opts.verified && !opts.expected) throw new ImageError('DIGEST_INVALID', 'a pre-verified blob needs its digest')
  const algorithm = opts.expected ? digestAlgorithm(opts.expected) : 'sha256'
  const folder = join(dir, 'blobs', algorithm)
  await mkdir(folder, { recursive: true })
  const tmp = join(folder, `.tmp-${randomBytes(8).toString('hex')}`)
  const durable = opts.durable !== false
  let file: BlobFile | undefined
  try {
    signal?.throwIfAborted()
    file = await BlobFile.create(tmp, { algorithm: opts.verified ? undefined : algorithm, size: opts.size, flush: durable })
    const { bytes: size, hex } = await drainInto(stream, file, { size: opts.size, what: `blob ${opts.expected ?? ''}`.trimEnd(), signal })
    const digest = hex ? (`${algorithm}:${hex}` as Digest) : opts.expected!
    checkDigest({ digest, bytes: size }, { expected: opts.expected, size: opts.size })
    if (durable) await file.sync()
    await file.close()
    signal?.throwIfAborted()
    await rename(tmp, blobPath(dir, digest))
    log('stored %s (%d bytes)', digest, size)
    return { digest, size }
  } catch (err) {
    stream.destroy()
    throw signal?.aborted ? signal.reason : err
  } finally {
    await file?.close()
    await rm(tmp, { force: true })
  }
}

/**
 * Stores bytes held in memory as a blob (manifests, indexes, configs), verified against
 * `expected` when given. `durable: false` skips the fsync, for blobs a pull can fetch again
 * (every read of a small blob verifies it, so a copy torn by a power loss is found).
 */
export async function writeBlobBytes(dir: string, bytes: Buffer, expected?: Digest, opts: { durable?: boolean } = {}): Promise<Digest> {
  const digest = digestOf(bytes, expected ? digestAlgorithm(expected) : 'sha256')
  if (expected && digest !== expected) throw new DigestMismatchError(expected, digest)
  const existing = await readBlobIfValid(dir, digest)
  if (existing) return digest
  await writeBlob(dir, Readable.from([bytes]), { expected: digest, size: bytes.length, durable: opts.durable })
  return digest
}

/**
 * Reads a small blob whole and verifies it. Throws `BLOB_UNKNOWN` when missing and
 * `DIGEST_INVALID` when its bytes do not match (a damaged or truncated copy).
 */
export async function readSmallBlob(dir: string, digest: Digest, max = MAX_SMALL_BLOB): Promise<Buffer> {
  let bytes: Buffer
  try {
    const fh = await open(blobPath(dir, digest), 'r')
    try {
      const { size } = await fh.stat()
      if (size > max) throw new ImageError('SIZE_INVALID', `blob ${digest}: ${size} bytes is more than ${max}`)
      bytes = await fh.readFile()
    } finally {
      await fh.close()
    }
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') throw new ImageError('BLOB_UNKNOWN', `blob ${digest} not found in the cache`, { cause: err })
    throw err
  }
  const actual = digestOf(bytes, digestAlgorithm(digest))
  if (actual !== digest) throw new DigestMismatchError(digest, actual)
  return bytes
}

/** Reads a small blob if it is present and intact; undefined otherwise. */
export async function readBlobIfValid(dir: string, digest: Digest): Promise<Buffer | undefined> {
  try {
    return await readSmallBlob(dir, digest)
  } catch (err) {
    const code = (err as ImageError).code
    if (code === 'BLOB_UNKNOWN' || code === 'DIGEST_INVALID' || code === 'SIZE_INVALID') return undefined
    throw err
  }
}

/** Reads and parses a manifest or index blob (verified). */
export async function readManifestBlob(dir: string, d: Pick<Descriptor, 'digest' | 'mediaType'>): Promise<ParsedManifest & { bytes: Buffer }> {
  const bytes = await readSmallBlob(dir, d.digest)
  return { ...parseManifest(bytes, d.mediaType), bytes }
}

/** Hashes a whole blob file; true when it matches its name. */
export async function blobIntact(dir: string, digest: Digest): Promise<boolean> {
  const v = verifyDigest({ expected: digest })
  try {
    await pipeline(createReadStream(blobPath(dir, digest), { highWaterMark: CHUNK }), v, async function* (src) {
      for await (const _ of src) {
        // hash only
      }
    })
    return true
  } catch (err) {
    if (errnoCode(err) === 'ENOENT' || (err as ImageError).code === 'DIGEST_INVALID') return false
    throw err
  }
}

/**
 * Every digest reachable from `roots`: the roots, the children of indexes (recursively), and
 * the config and layers of image manifests. Manifests that are missing or damaged contribute
 * only themselves; `unreadable` collects them.
 */
export async function reachableBlobs(dir: string, roots: Descriptor[], unreadable?: Set<Digest>): Promise<Set<Digest>> {
  const seen = new Set<Digest>()
  const visit = async (d: Descriptor, depth: number): Promise<void> => {
    if (seen.has(d.digest)) return
    seen.add(d.digest)
    if (!isManifestMediaType(d.mediaType) || depth > 8) return
    let parsed: ParsedManifest
    try {
      parsed = await readManifestBlob(dir, d)
    } catch (err) {
      log('cannot read manifest %s: %s', d.digest, (err as Error).message)
      unreadable?.add(d.digest)
      return
    }
    if (parsed.kind === 'index') {
      for (const child of parsed.index.manifests) await visit(child, depth + 1)
    } else {
      seen.add(parsed.manifest.config.digest)
      for (const layer of parsed.manifest.layers) seen.add(layer.digest)
    }
  }
  for (const root of roots) await visit(root, 0)
  return seen
}

/**
 * Opens a blob for reading, verified as it streams: the stream fails with `DIGEST_INVALID` (or
 * `SIZE_INVALID`) at its end when the bytes do not match, instead of ending. A missing blob
 * rejects with `BLOB_UNKNOWN`.
 */
export async function openVerifiedBlob(dir: string, digest: Digest, opts: { size?: number; signal?: AbortSignal } = {}): Promise<{ stream: Readable; size: number }> {
  opts.signal?.throwIfAborted()
  const fh = await open(blobPath(dir, digest), 'r').catch((err) => {
    if (errnoCode(err) === 'ENOENT') throw new ImageError('BLOB_UNKNOWN', `blob ${digest} not found in the cache`, { cause: err })
    throw err
  })
  let size: number
  try {
    size = (await fh.stat()).size
  } catch (err) {
    await fh.close()
    throw err
  }
  if (opts.size !== undefined && opts.size >= 0 && opts.size !== size) {
    await fh.close()
    throw new ImageError('SIZE_INVALID', `blob ${digest} in the cache has ${size} bytes, expected ${opts.size}`)
  }
  const file = fh.createReadStream({ highWaterMark: CHUNK })
  const verify = verifyDigest({ expected: digest, size })
  const stream = pipelineStreams(file, verify, () => {})
  if (opts.signal) addAbortSignal(opts.signal, stream)
  return { stream, size }
}
