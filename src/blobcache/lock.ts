// A cross-process lock for read-modify-write updates of small cache files (the notes). The lock
// is a file created with O_EXCL; a lock older than `staleMs` is taken to belong to a process
// that died and is broken. Holders keep it for milliseconds, so waiters poll with short sleeps.
import { randomBytes } from 'node:crypto'
import { link, open, rename, stat, unlink } from 'node:fs/promises'
import { setTimeout as sleep } from 'node:timers/promises'
import debug from 'debug'
import { ImageError, errnoCode } from '../errors.js'
import { FILE_MODE } from './files.js'

const log = debug('blobcache:blobcache:lock')

/** Options of {@link withLock}. */
export interface LockOptions {
  /** Age after which an existing lock is considered abandoned and broken. Default 10 s. */
  staleMs?: number
  /** How long to wait for the lock before failing with `CACHE_INVALID`. Default 30 s. */
  timeoutMs?: number
}

/**
 * Runs `fn` while holding the lock file `lockPath` and releases it afterwards, whatever `fn`
 * does. The lock MUST live in the directory it protects. Fails with `CACHE_INVALID` after
 * `timeoutMs`, or with the file system's error when the lock cannot be created at all.
 */
export async function withLock<T>(lockPath: string, fn: () => Promise<T>, opts: LockOptions = {}): Promise<T> {
  const staleMs = opts.staleMs ?? 10_000
  const deadline = Date.now() + (opts.timeoutMs ?? 30_000)
  let ino: number
  for (let attempt = 0; ; attempt++) {
    try {
      ino = await create(lockPath)
      break
    } catch (err) {
      if (errnoCode(err) !== 'EEXIST') throw err
    }
    if (await breakIfStale(lockPath, staleMs)) continue
    if (Date.now() > deadline) throw new ImageError('CACHE_INVALID', `timed out waiting for the lock ${lockPath}`)
    await sleep(Math.min(2 + attempt, 20) + Math.random() * 10)
  }
  try {
    return await fn()
  } finally {
    await release(lockPath, ino)
  }
}

async function create(lockPath: string): Promise<number> {
  const fh = await open(lockPath, 'wx', FILE_MODE)
  try {
    await fh.writeFile(`${process.pid}\n`)
    return (await fh.stat()).ino
  } finally {
    await fh.close()
  }
}

/** Removes the lock only if it is still ours (it may have been broken as stale meanwhile). */
async function release(lockPath: string, ino: number): Promise<void> {
  try {
    if ((await stat(lockPath)).ino === ino) await unlink(lockPath)
    else log('lock %s was taken over while held', lockPath)
  } catch {
    // already gone
  }
}

/**
 * Breaks the lock if it is older than `staleMs`. Returns true when the caller should retry at
 * once (the lock is gone). The lock is moved aside before it is removed; if what was moved turns
 * out to be a fresh lock taken in between, it is put back.
 */
async function breakIfStale(lockPath: string, staleMs: number): Promise<boolean> {
  let seen
  try {
    seen = await stat(lockPath)
  } catch (err) {
    return errnoCode(err) === 'ENOENT'
  }
  if (Date.now() - seen.mtimeMs < staleMs) return false
  const aside = `${lockPath}.stale-${randomBytes(6).toString('hex')}`
  try {
    await rename(lockPath, aside)
  } catch (err) {
    return errnoCode(err) === 'ENOENT'
  }
  try {
    if ((await stat(aside)).ino !== seen.ino) {
      await link(aside, lockPath).catch(() => {})
      return false
    }
    log('broke stale lock %s (%d ms old)', lockPath, Date.now() - seen.mtimeMs)
    return true
  } finally {
    await unlink(aside).catch(() => {})
  }
}
