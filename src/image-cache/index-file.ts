// index.json of the image cache: read and validated on every use (never trusted, never
// repaired silently), and replaced atomically (temp file, fsync, rename) under the cache's
// cross-process lock, which is held only for the read-modify-write itself.
import { randomBytes } from 'node:crypto'
import { mkdir, open, readFile, rename, rm } from 'node:fs/promises'
import { dirname, join } from 'node:path'
import debug from 'debug'
import { ImageError, errnoCode } from '../errors.js'
import { type Descriptor, type ImageIndex, checkDescriptor } from '../manifest.js'
import { MediaType } from '../media-types.js'
import { type FileLockOptions, withFileLock } from '../file-lock.js'

const log = debug('blobcache:image-cache:index-file')

/** The root index of the layout. */
export const INDEX_FILE = 'index.json'
/** The layout marker. */
export const LAYOUT_FILE = 'oci-layout'
/** The lock file guarding updates of index.json. */
export const LOCK_FILE = 'index.json.lock'
/** Bytes of the `oci-layout` file this cache writes. */
export const LAYOUT_CONTENT = JSON.stringify({ imageLayoutVersion: '1.0.0' })
/** Largest index.json read (64 MiB: about 200 000 entries). */
const MAX_INDEX_BYTES = 64 << 20

/** An empty root index. */
export function emptyIndex(): ImageIndex {
  return { schemaVersion: 2, mediaType: MediaType.ociIndex, manifests: [] }
}

function corrupt(dir: string, why: string, cause?: unknown): ImageError {
  return new ImageError('CACHE_INVALID', `corrupt image cache ${dir}: ${why}`, cause === undefined ? undefined : { cause })
}

/**
 * Parses and validates index.json bytes: a JSON object with schemaVersion 2 and a manifests
 * array of valid descriptors. Anything else throws `CACHE_INVALID` ("corrupt image cache").
 */
export function parseIndex(dir: string, bytes: Buffer): ImageIndex {
  let doc: unknown
  try {
    doc = JSON.parse(bytes.toString('utf8'))
  } catch (err) {
    throw corrupt(dir, `index.json is not valid JSON (${bytes.length} bytes; truncated?)`, err)
  }
  if (typeof doc !== 'object' || doc === null || Array.isArray(doc)) throw corrupt(dir, 'index.json is not a JSON object')
  const m = doc as Record<string, unknown>
  if (m.schemaVersion !== 2) throw corrupt(dir, `index.json has schemaVersion ${JSON.stringify(m.schemaVersion)}`)
  if (!Array.isArray(m.manifests)) throw corrupt(dir, 'index.json has no manifests array')
  try {
    m.manifests.forEach((d, i) => checkDescriptor(d, `index.json manifests[${i}]`))
  } catch (err) {
    throw corrupt(dir, (err as Error).message, err)
  }
  return m as unknown as ImageIndex
}

/**
 * Reads index.json. A missing file is `CACHE_INVALID` too (the layout was not opened with
 * {@link initLayout}); fs errors other than ENOENT propagate.
 */
export async function readIndex(dir: string, opts: { signal?: AbortSignal } = {}): Promise<ImageIndex> {
  let bytes: Buffer
  try {
    const fh = await open(join(dir, INDEX_FILE), 'r')
    try {
      const { size } = await fh.stat()
      if (size > MAX_INDEX_BYTES) throw corrupt(dir, `index.json is ${size} bytes, more than ${MAX_INDEX_BYTES}`)
      bytes = await fh.readFile({ signal: opts.signal })
    } finally {
      await fh.close()
    }
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') throw corrupt(dir, 'index.json is missing', err)
    throw err
  }
  return parseIndex(dir, bytes)
}

/** Serialises an index the way this cache stores it (compact JSON, stable field order). */
export function serializeIndex(index: ImageIndex): Buffer {
  const out: Record<string, unknown> = { schemaVersion: 2, mediaType: index.mediaType ?? MediaType.ociIndex }
  for (const [k, v] of Object.entries(index)) if (!(k in out) && k !== 'manifests') out[k] = v
  out.manifests = index.manifests
  return Buffer.from(JSON.stringify(out))
}

/**
 * Replaces `path` with `data` atomically and durably: a `.tmp-` file in the same directory,
 * fsync, rename, then fsync of the directory. Readers see the old bytes or the new ones.
 */
export async function replaceFile(path: string, data: Buffer | string, opts: { syncDir?: boolean } = {}): Promise<void> {
  const tmp = join(dirname(path), `.tmp-${randomBytes(8).toString('hex')}`)
  try {
    const fh = await open(tmp, 'wx', 0o644)
    try {
      await fh.writeFile(data)
      await fh.sync()
    } finally {
      await fh.close()
    }
    await rename(tmp, path)
  } finally {
    await rm(tmp, { force: true })
  }
  if (opts.syncDir !== false) await syncDir(dirname(path))
}

async function syncDir(dir: string): Promise<void> {
  try {
    const fh = await open(dir, 'r')
    try {
      await fh.sync()
    } finally {
      await fh.close()
    }
  } catch (err) {
    log('fsync of %s failed: %s', dir, (err as Error).message) // not supported everywhere
  }
}

/**
 * Runs `fn` with the current index under the cache lock; when it returns an index, that index
 * replaces index.json, and then `after` (deleting what the new index no longer needs) runs,
 * before the lock is released. The lock is not re-entrant: `fn` MUST NOT call updateIndex on
 * the same cache.
 */
export async function updateIndex<T>(
  dir: string,
  fn: (index: ImageIndex) => Promise<{ index?: ImageIndex; result: T; after?: () => Promise<unknown> }>,
  opts: FileLockOptions = {},
): Promise<T> {
  return withFileLock(join(dir, LOCK_FILE), async () => {
    opts.signal?.throwIfAborted()
    const current = await readIndex(dir)
    const { index, result, after } = await fn(current)
    if (index) {
      await replaceFile(join(dir, INDEX_FILE), serializeIndex(index))
      log('index.json of %s: %d entries', dir, index.manifests.length)
    }
    await after?.()
    return result
  }, opts)
}

/**
 * Creates the layout at `dir` where parts are missing (directory, `blobs/sha256`, `oci-layout`,
 * an empty `index.json`), under the lock and checking again there. An existing layout is left
 * byte for byte as it is, after checking that `oci-layout` names a 1.x layout and that
 * index.json is valid (`CACHE_INVALID` otherwise: a corrupt cache is never replaced).
 */
export async function initLayout(dir: string, opts: FileLockOptions = {}): Promise<void> {
  await mkdir(join(dir, 'blobs', 'sha256'), { recursive: true })
  const layout = await readFile(join(dir, LAYOUT_FILE)).catch((err) => {
    if (errnoCode(err) === 'ENOENT') return undefined
    throw err
  })
  if (layout) checkLayout(dir, layout)
  const index = await readFile(join(dir, INDEX_FILE)).catch((err) => {
    if (errnoCode(err) === 'ENOENT') return undefined
    throw err
  })
  if (layout && index) {
    parseIndex(dir, index)
    return
  }
  await withFileLock(join(dir, LOCK_FILE), async () => {
    const l = await readFile(join(dir, LAYOUT_FILE)).catch(() => undefined)
    if (!l) await replaceFile(join(dir, LAYOUT_FILE), LAYOUT_CONTENT, { syncDir: false })
    const i = await readFile(join(dir, INDEX_FILE)).catch(() => undefined)
    if (i) parseIndex(dir, i)
    else {
      await replaceFile(join(dir, INDEX_FILE), serializeIndex(emptyIndex()), { syncDir: false })
      log('created image cache %s', dir)
    }
    await syncDir(dir)
  }, opts)
}

function checkLayout(dir: string, bytes: Buffer): void {
  let version: unknown
  try {
    version = (JSON.parse(bytes.toString('utf8')) as Record<string, unknown>).imageLayoutVersion
  } catch (err) {
    throw corrupt(dir, 'oci-layout is not valid JSON', err)
  }
  if (typeof version !== 'string' || !/^1\.\d+\.\d+$/.test(version)) {
    throw corrupt(dir, `oci-layout names an unsupported layout version ${JSON.stringify(version)}`)
  }
}

/** The root entries of an index as descriptors (they are validated by {@link parseIndex}). */
export function roots(index: ImageIndex): Descriptor[] {
  return index.manifests
}
