// A cross-process lock for the image cache's read-modify-write of index.json. The lock is a
// file created with O_EXCL that records its holder (host, pid, a random token, the time). A
// waiter breaks it when the holder is gone: same host and the pid no longer exists (a SIGKILL
// mid-update), or, as a last resort, when it is older than `staleMs`. Breaking happens under a
// second O_EXCL file, and the lock is re-read there, so two waiters cannot both break it and
// remove the fresh lock one of them just took. Within a process, callers queue on a promise
// chain first, so one process never polls against itself.
import { randomBytes } from 'node:crypto'
import { open, readFile, stat, unlink } from 'node:fs/promises'
import { hostname } from 'node:os'
import { resolve } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import debug from 'debug'
import { ImageError, errnoCode } from './errors.js'

const log = debug('blobcache:file-lock')

/** Options of {@link withFileLock}. */
export interface FileLockOptions {
  /** How long to wait for the lock before failing with `CACHE_INVALID`. Default 120 s. */
  timeoutMs?: number
  /**
   * Age after which a lock whose holder still seems alive (or lives on another host) is broken
   * anyway. Holders keep it for milliseconds. Default 10 minutes.
   */
  staleMs?: number
  /** Aborts the wait; the call then rejects with `signal.reason`. */
  signal?: AbortSignal
}

/** What a lock file records about its holder. */
interface Holder {
  host: string
  pid: number
  token: string
  time: number
}

/** A lock file that is still empty or torn this long after its creation belongs to a dead creator. */
const TORN_GRACE_MS = 2000
const HOST = hostname()
const queues = new Map<string, Promise<unknown>>()

/**
 * Runs `fn` while holding the lock file `path` (in this process and across processes) and
 * releases it afterwards, whatever `fn` does. The lock survives nothing: a holder killed with
 * SIGKILL leaves a file that the next waiter on the same host breaks at once.
 */
export async function withFileLock<T>(path: string, fn: () => Promise<T>, opts: FileLockOptions = {}): Promise<T> {
  const key = resolve(path)
  const previous = queues.get(key) ?? Promise.resolve()
  const run = previous.catch(() => undefined).then(async () => {
    const token = await acquire(key, opts)
    try {
      return await fn()
    } finally {
      await release(key, token)
    }
  })
  const settled = run.catch(() => undefined)
  queues.set(key, settled)
  try {
    return await run
  } finally {
    if (queues.get(key) === settled) queues.delete(key)
  }
}

async function acquire(path: string, opts: FileLockOptions): Promise<string> {
  const deadline = Date.now() + (opts.timeoutMs ?? 120_000)
  const staleMs = opts.staleMs ?? 10 * 60_000
  for (let attempt = 0; ; attempt++) {
    opts.signal?.throwIfAborted()
    const token = await tryCreate(path)
    if (token) return token
    if (await breakIfStale(path, staleMs)) continue
    if (Date.now() > deadline) throw new ImageError('CACHE_INVALID', `timed out waiting for the lock ${path}`)
    await sleep(Math.min(1 + attempt * 2, 25) + Math.random() * 5, undefined, opts.signal ? { signal: opts.signal } : {}).catch((err) => {
      throw opts.signal?.aborted ? opts.signal.reason : err
    })
  }
}

/**
 * Takes the lock file `path` without waiting for a live holder (a dead holder's lock is broken
 * first). Resolves a release function, or undefined when another live holder has it. Unlike
 * {@link withFileLock} it does not queue callers of this process.
 */
export async function tryFileLock(path: string, opts: Pick<FileLockOptions, 'staleMs'> = {}): Promise<(() => Promise<void>) | undefined> {
  for (let attempt = 0; attempt < 3; attempt++) {
    const token = await tryCreate(path)
    if (token) return () => release(path, token)
    if (!(await breakIfStale(path, opts.staleMs ?? 10 * 60_000))) return undefined
  }
  return undefined
}

/** True when `path` is a lock whose holder is gone (or that is older than `staleMs`), or no lock at all. */
export async function lockAbandoned(path: string, staleMs = 10 * 60_000): Promise<boolean> {
  if ((await readHolder(path)) === undefined) return true
  return (await staleReason(path, staleMs)) !== undefined
}

/** Creates the lock file; resolves its token, or undefined when it exists already. */
async function tryCreate(path: string): Promise<string | undefined> {
  const holder: Holder = { host: HOST, pid: process.pid, token: randomBytes(12).toString('hex'), time: Date.now() }
  let fh
  try {
    fh = await open(path, 'wx', 0o644)
  } catch (err) {
    if (errnoCode(err) === 'EEXIST') return undefined
    throw err
  }
  try {
    await fh.writeFile(JSON.stringify(holder))
  } finally {
    await fh.close()
  }
  return holder.token
}

async function readHolder(path: string): Promise<Holder | 'torn' | undefined> {
  let text: string
  try {
    text = await readFile(path, 'utf8')
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return undefined
    throw err
  }
  try {
    const h = JSON.parse(text) as Holder
    if (typeof h.pid === 'number' && typeof h.token === 'string' && typeof h.host === 'string') return h
  } catch {
    // fall through
  }
  return 'torn'
}

/** Removes the lock only if it still holds our token. */
async function release(path: string, token: string): Promise<void> {
  const h = await readHolder(path).catch(() => undefined)
  if (h === undefined) return // removed with its directory
  if (h !== 'torn' && h.token === token) await unlink(path).catch(() => {})
  else log('lock %s was broken while held', path)
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    return errnoCode(err) === 'EPERM'
  }
}

/** Why the current lock may be broken, or undefined when its holder may still be working. */
async function staleReason(path: string, staleMs: number): Promise<{ why: string; token: string } | undefined> {
  const h = await readHolder(path)
  if (h === undefined) return undefined
  let age: number
  try {
    age = Date.now() - (await stat(path)).mtimeMs
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return undefined
    throw err
  }
  if (h === 'torn') return age > TORN_GRACE_MS ? { why: 'torn lock file', token: '' } : undefined
  if (h.host === HOST && h.pid !== process.pid && !processAlive(h.pid)) return { why: `holder ${h.pid} is gone`, token: h.token }
  if (age > staleMs) return { why: `held for ${age} ms`, token: h.token }
  return undefined
}

/**
 * Breaks the lock if its holder is gone. Resolves true when the caller should retry at once.
 * Breakers serialise on `<path>.break` and re-read the lock there, so only a lock that is still
 * the stale one is removed.
 */
async function breakIfStale(path: string, staleMs: number): Promise<boolean> {
  if (!(await staleReason(path, staleMs))) return false
  const breaker = `${path}.break`
  const token = await tryCreate(breaker)
  if (!token) {
    // someone else is breaking it; a breaker that died is itself broken by the same rules
    const reason = await staleReason(breaker, 30_000)
    if (reason) {
      log('removing abandoned breaker %s (%s)', breaker, reason.why)
      await unlink(breaker).catch(() => {})
    }
    return false
  }
  try {
    const reason = await staleReason(path, staleMs)
    if (!reason) return true
    await unlink(path).catch((err) => {
      if (errnoCode(err) !== 'ENOENT') throw err
    })
    log('broke lock %s: %s', path, reason.why)
    return true
  } finally {
    await release(breaker, token)
  }
}
