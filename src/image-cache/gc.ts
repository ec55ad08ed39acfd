// Deleting blobs, always under the index lock and always by reference counting: a blob is
// removed only when no root left in index.json reaches it. A pull or import that found a blob
// present re-checks its blobs under the same lock before naming anything, so a concurrent
// delete makes it fetch again rather than name a hole.
import { readdir, rm, stat } from 'node:fs/promises'
import { join } from 'node:path'
import debug from 'debug'
import { type Digest, digestFrom } from '../digest.js'
import { errnoCode } from '../errors.js'
import type { Descriptor } from '../manifest.js'
import { blobIntact, blobPath, reachableBlobs } from './blobs.js'
import { emptyIndex, updateIndex } from './index-file.js'
import type { FileLockOptions } from '../file-lock.js'
import { entryName } from './names.js'
import { ContentStore } from './store.js'

const log = debug('blobcache:image-cache:gc')

/** Options of {@link collectGarbage}. */
export interface GcOptions {
  /**
   * Unreferenced blobs, temporary files and abandoned ingests younger than this are kept: they
   * may belong to a pull or import under way. Default 10 minutes.
   */
  graceMs?: number
  /** Also hash every blob and remove those whose bytes do not match their name. Default false. */
  verify?: boolean
  signal?: AbortSignal
}

/** What gc removed. */
export interface GcReport {
  /** Unreferenced blobs removed. */
  removed: Digest[]
  /** Blobs removed because their bytes did not match their digest (with `verify`). */
  damaged: Digest[]
  /** Bytes freed by both. */
  freedBytes: number
  /** Temporary files and abandoned ingests removed. */
  leftovers: number
  /** Blobs kept. */
  kept: number
}

const ALGORITHMS = ['sha256', 'sha512'] as const

/** Every blob file of the cache, with its size and age. */
async function listBlobs(dir: string): Promise<{ digest?: Digest; path: string; size: number; mtimeMs: number; temp: boolean }[]> {
  const out = []
  for (const alg of ALGORITHMS) {
    const folder = join(dir, 'blobs', alg)
    const names = await readdir(folder).catch(() => [] as string[])
    for (const name of names) {
      const path = join(folder, name)
      const s = await stat(path).catch(() => undefined)
      if (!s?.isFile()) continue
      let digest: Digest | undefined
      try {
        digest = digestFrom(alg, name)
      } catch {
        digest = undefined
      }
      out.push({ digest, path, size: s.size, mtimeMs: s.mtimeMs, temp: name.startsWith('.tmp-') })
    }
  }
  return out
}

/** Removes a blob file; resolves its size, or undefined when it was not there. */
async function removeBlob(dir: string, digest: Digest): Promise<number | undefined> {
  const path = blobPath(dir, digest)
  const size = (await stat(path).catch(() => undefined))?.size ?? 0
  try {
    await rm(path)
    return size
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return undefined
    throw err
  }
}

/**
 * Deletes the blobs `gone` reaches that `remaining` does not. Call under the index lock, after
 * index.json no longer names `gone`. Resolves the digests removed.
 */
export async function removeRoots(dir: string, gone: Descriptor[], remaining: Descriptor[]): Promise<Digest[]> {
  const drop = await reachableBlobs(dir, gone)
  return removeUnreferenced(dir, [...drop], remaining)
}

/** Deletes those of `digests` that no root of `remaining` reaches. Call under the index lock. */
export async function removeUnreferenced(dir: string, digests: Digest[], remaining: Descriptor[]): Promise<Digest[]> {
  const keep = await reachableBlobs(dir, remaining)
  const removed: Digest[] = []
  for (const d of digests) {
    if (keep.has(d)) continue
    if ((await removeBlob(dir, d)) !== undefined) removed.push(d)
  }
  log('removed %d blobs (%d kept as still used)', removed.length, digests.length - removed.length)
  return removed
}

/**
 * Removes every name and every blob (not the temporary files of writes under way), leaving an
 * empty, valid cache. Resolves the names removed.
 */
export async function removeEverything(dir: string, lock: FileLockOptions): Promise<string[]> {
  return updateIndex(dir, async (index) => {
    const names = index.manifests.map((d) => entryName(d) ?? d.digest)
    return {
      index: emptyIndex(),
      result: names,
      after: async () => {
        for (const b of await listBlobs(dir)) if (b.digest) await removeBlob(dir, b.digest)
      },
    }
  }, lock)
}

/** Runs garbage collection (see {@link GcOptions}). */
export async function collectGarbage(dir: string, opts: GcOptions & { lock?: FileLockOptions } = {}): Promise<GcReport> {
  const grace = opts.graceMs ?? 10 * 60_000
  const report: GcReport = { removed: [], damaged: [], freedBytes: 0, leftovers: 0, kept: 0 }
  if (opts.verify) {
    // no lock needed: a damaged blob is wrong for every name, and pulls repair it
    for (const b of await listBlobs(dir)) {
      opts.signal?.throwIfAborted()
      if (!b.digest || (await blobIntact(dir, b.digest))) continue
      report.freedBytes += (await removeBlob(dir, b.digest)) ?? 0
      report.damaged.push(b.digest)
    }
  }
  await updateIndex(dir, async (index) => {
    const keep = await reachableBlobs(dir, index.manifests)
    const now = Date.now()
    for (const b of await listBlobs(dir)) {
      opts.signal?.throwIfAborted()
      const old = now - b.mtimeMs >= grace
      if (b.temp || !b.digest) {
        if (b.temp && old) {
          await rm(b.path, { force: true })
          report.leftovers++
        }
        continue
      }
      if (keep.has(b.digest) || !old) {
        report.kept++
        continue
      }
      report.freedBytes += (await removeBlob(dir, b.digest)) ?? 0
      report.removed.push(b.digest)
    }
    for (const name of await readdir(dir)) {
      if (!name.startsWith('.tmp-')) continue
      const s = await stat(join(dir, name)).catch(() => undefined)
      if (s && now - s.mtimeMs >= grace) {
        await rm(join(dir, name), { force: true })
        report.leftovers++
      }
    }
    report.leftovers += await new ContentStore(dir).removeAbandonedIngests(grace)
    return { result: undefined }
  }, opts.lock ?? { signal: opts.signal })
  log('gc %s: %d removed, %d damaged, %d leftovers, %d bytes freed, %d kept', dir, report.removed.length, report.damaged.length, report.leftovers, report.freedBytes, report.kept)
  return report
}
