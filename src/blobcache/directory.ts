// The cache directory as a whole: finding a blob's entry, listing, checking (verify), bounding
// (prune) and emptying (clear). The directory is flat, in the containers/image layout; see
// files.ts for the names and notes.ts for the note files.
import { createHash } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { lstat, readFile, readdir, rm } from 'node:fs/promises'
import { join } from 'node:path'
import { pipeline } from 'node:stream/promises'
import debug from 'debug'
import { type Digest, digestAlgorithm, parseDigest } from '../digest.js'
import { ImageError, errnoCode } from '../errors.js'
import type { CallOptions } from '../types.js'
import { type EntryKind, HIGH_WATER_MARK, classifyName, entryName, fileExists, removeQuietly } from './files.js'
import { hasVerifiedStamp, stampVerified } from './stamp.js'
import { parseCompressedNote, readDecompressedNote, removeCompressedVariants } from './notes.js'

const log = debug('blobcache:blobcache:directory')

/** Age after which a leftover temporary file is removed by {@link CacheDirectory.prune}. */
export const STALE_TEMP_MS = 60 * 60 * 1000

/** One file of a cache directory. */
export interface CacheEntry {
  /** The file name within the directory. */
  name: string
  /** The digest the name carries (blobs, configs and notes). */
  digest?: Digest
  /** Size in bytes (0 for directories). */
  size: number
  /** `blob` (layers and manifests), `config`, `note`, `temp` (temporaries and locks) or `other`. */
  kind: EntryKind
  /** Last modification; the cache also sets it when an entry is used, for LRU pruning. */
  mtime: Date
  /** Last access, where the file system records it. */
  atime: Date
}

/** What {@link CacheDirectory.verify} did. */
export interface VerifyResult {
  /** Entries checked (blobs, configs and notes). */
  checked: number
  /** Names of the entries removed because their bytes did not match their name. */
  removed: string[]
  /** Bytes hashed. */
  bytesChecked: number
}

/** Options of {@link CacheDirectory.prune}. */
export interface PruneOptions extends CallOptions {
  /** Evict least-recently-used entries until the entries left take at most this many bytes. */
  maxBytes?: number
  /** Evict entries not used for this many milliseconds. */
  olderThan?: number
}

/** What {@link CacheDirectory.prune} did. */
export interface PruneResult {
  /** Names of the files removed. */
  removed: string[]
  /** Bytes they held. */
  freedBytes: number
  /** Bytes held by the cache entries (blobs, configs, notes) left. */
  keptBytes: number
}

/** A blob found in the cache. */
export interface FoundBlob {
  path: string
  name: string
  size: number
  isConfig: boolean
}

/**
 * Looks up the entry of `digest`: `<digest>`, then `<digest>.config`. With `size` >= 0 the entry
 * MUST have that size; an entry of another size is corrupt (truncated or foreign), so it is
 * removed and the lookup goes on as if it was not there. Only regular files count: a symbolic
 * link is never followed out of the directory. Errors other than "not there" reject.
 */
export async function findBlob(dir: string, digest: Digest, size = -1): Promise<FoundBlob | undefined> {
  for (const isConfig of [false, true]) {
    const name = entryName(digest, isConfig)
    const path = join(dir, name)
    let st
    try {
      st = await lstat(path)
    } catch (err) {
      const code = errnoCode(err)
      if (code === 'ENOENT' || code === 'ENOTDIR') continue
      throw err
    }
    if (!st.isFile()) continue
    if (size >= 0 && st.size !== size) {
      log('removing %s: %d bytes, expected %d', name, st.size, size)
      await removeQuietly(path)
      continue
    }
    return { path, name, size: st.size, isConfig }
  }
  return undefined
}

/** Hashes a file with the algorithm of `digest` and tells whether it matches. */
export async function fileMatchesDigest(path: string, digest: Digest, opts: CallOptions = {}): Promise<boolean> {
  const hash = createHash(digestAlgorithm(digest))
  await pipeline(createReadStream(path, { highWaterMark: HIGH_WATER_MARK }), hash, { signal: opts.signal })
  return `${digestAlgorithm(digest)}:${hash.digest('hex')}` === digest
}

/**
 * Whether the entry at `path` may be handed out unread as the blob `digest`: true at once when
 * it carries a valid verification stamp (nothing has written to it since it was verified, see
 * stamp.ts), else when its bytes hash to `digest`, and it is then stamped. Read errors reject.
 */
export async function entryIntact(path: string, digest: Digest, opts: CallOptions = {}): Promise<boolean> {
  if (await hasVerifiedStamp(path)) return true
  if (!(await fileMatchesDigest(path, digest, opts))) return false
  await stampVerified(path)
  return true
}

/**
 * A blob cache directory: list, look up, verify, prune and clear it. It never creates the
 * directory; every operation on a missing one fails `CACHE_INVALID`. Safe to use while other
 * processes read and write the same directory.
 */
export class CacheDirectory {
  constructor(readonly dir: string) {
    if (!dir) throw new ImageError('CACHE_INVALID', 'no cache directory specified')
  }

  /** Lists every file of the directory, classified. */
  async list(): Promise<CacheEntry[]> {
    const names = await this.#names()
    const out: CacheEntry[] = []
    for (const name of names) {
      let st
      try {
        st = await lstat(join(this.dir, name))
      } catch {
        continue // removed meanwhile
      }
      const c = classifyName(name)
      const regular = st.isFile()
      const entry: CacheEntry = {
        name,
        size: regular ? st.size : 0,
        kind: regular || c.kind === 'temp' ? c.kind : 'other',
        mtime: st.mtime,
        atime: st.atime,
      }
      if (c.digest && entry.kind !== 'other') entry.digest = c.digest
      out.push(entry)
    }
    return out.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))
  }

  /** True when the blob `digest` is cached (as `<digest>` or `<digest>.config`). */
  async has(digest: string): Promise<boolean> {
    return (await this.find(digest)) !== undefined
  }

  /** The cached entry of the blob `digest`, or undefined. Throws `DIGEST_INVALID` for a bad digest. */
  async find(digest: string): Promise<FoundBlob | undefined> {
    await this.#names() // the directory must exist
    return findBlob(this.dir, parseDigest(digest))
  }

  /**
   * Re-hashes every blob and config entry and removes those whose bytes do not match their name;
   * also removes notes that do not parse.
   */
  async verify(opts: CallOptions = {}): Promise<VerifyResult> {
    const result: VerifyResult = { checked: 0, removed: [], bytesChecked: 0 }
    for (const e of await this.list()) {
      opts.signal?.throwIfAborted()
      if (!e.digest) continue
      const path = join(this.dir, e.name)
      let ok: boolean
      try {
        if (e.kind === 'note') ok = await this.#noteIsValid(e.name, e.digest)
        else {
          ok = await fileMatchesDigest(path, e.digest, opts)
          if (ok) await stampVerified(path, e.size)
          result.bytesChecked += e.size
        }
      } catch (err) {
        if (opts.signal?.aborted) throw opts.signal.reason
        if (errnoCode(err) === 'ENOENT') continue // removed meanwhile
        throw err
      }
      result.checked++
      if (!ok) {
        log('verify: removing corrupt %s', e.name)
        await rm(path, { force: true })
        result.removed.push(e.name)
      }
    }
    return result
  }

  /**
   * Evicts entries, least recently used first, together with their notes: those unused for
   * `olderThan` ms, then more until the entries left take at most `maxBytes`. Also removes
   * temporary files older than an hour, and notes whose targets are all gone.
   */
  async prune(opts: PruneOptions = {}): Promise<PruneResult> {
    const result: PruneResult = { removed: [], freedBytes: 0, keptBytes: 0 }
    const now = Date.now()
    const remove = async (e: CacheEntry) => {
      await rm(join(this.dir, e.name), { force: true, recursive: true })
      result.removed.push(e.name)
      result.freedBytes += e.size
    }
    const groups = new Map<Digest, { entries: CacheEntry[]; lastUsed: number; bytes: number }>()
    for (const e of await this.list()) {
      if (e.kind === 'temp' && now - e.mtime.getTime() > STALE_TEMP_MS) await remove(e)
      if (!e.digest) continue
      const g = groups.get(e.digest) ?? { entries: [], lastUsed: 0, bytes: 0 }
      g.entries.push(e)
      g.bytes += e.size
      groups.set(e.digest, g)
    }
    for (const g of groups.values()) {
      const main = g.entries.filter((e) => e.kind !== 'note')
      g.lastUsed = Math.max(...(main.length ? main : g.entries).map((e) => Math.max(e.mtime.getTime(), e.atime.getTime())))
    }
    const order = [...groups].sort((a, b) => a[1].lastUsed - b[1].lastUsed)
    let total = order.reduce((n, [, g]) => n + g.bytes, 0)
    for (const [digest, g] of order) {
      opts.signal?.throwIfAborted()
      const old = opts.olderThan !== undefined && now - g.lastUsed > opts.olderThan
      const over = opts.maxBytes !== undefined && total > opts.maxBytes
      if (!old && !over) continue
      log('prune: evicting %s (%d bytes)', digest, g.bytes)
      for (const e of g.entries) await remove(e)
      total -= g.bytes
      groups.delete(digest)
    }
    for (const [digest, g] of groups) {
      for (const e of g.entries) {
        if (e.kind !== 'note' || !(await this.#noteIsOrphan(e.name, digest))) result.keptBytes += e.size
        else {
          result.removed.push(e.name)
          result.freedBytes += e.size
        }
      }
    }
    return result
  }

  /** Removes every file and subdirectory of the cache directory, keeping the directory. */
  async clear(): Promise<void> {
    for (const name of await this.#names()) await rm(join(this.dir, name), { recursive: true, force: true })
  }

  async #names(): Promise<string[]> {
    try {
      return await readdir(this.dir)
    } catch (err) {
      throw new ImageError('CACHE_INVALID', `cannot read cache directory ${this.dir}: ${(err as Error).message}`, { cause: err })
    }
  }

  async #noteIsValid(name: string, digest: Digest): Promise<boolean> {
    if (name.endsWith('.decompressed')) return (await readDecompressedNote(this.dir, digest)) !== undefined
    return parseCompressedNote(await readFile(join(this.dir, name), 'utf8')).size > 0
  }

  /**
   * Drops a note's entries whose target is gone; true when the whole note went. A `.compressed`
   * note is edited under its lock, so concurrent additions survive.
   */
  async #noteIsOrphan(name: string, digest: Digest): Promise<boolean> {
    const exists = (d: Digest) => fileExists(join(this.dir, d))
    if (name.endsWith('.decompressed')) {
      const target = await readDecompressedNote(this.dir, digest).catch(() => undefined)
      if (target && (await exists(target))) return false
      await removeQuietly(join(this.dir, name))
      return true
    }
    await removeCompressedVariants(this.dir, digest, async (d) => !(await exists(d))).catch(() => false)
    return !(await fileExists(join(this.dir, name)))
  }
}
