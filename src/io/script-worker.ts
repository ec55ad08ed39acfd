// The worker threads of the package (hashing, decompression) run a small CommonJS script given
// as source text. They start the same way: none of this process's flags (loaders, --inspect) or
// output streams (the scripts print nothing), the environment shared, not keeping the process
// alive while idle; a thread that fails or exits reports it once.
import type { Worker } from 'node:worker_threads'
import { requireLazily } from '../lazy-require.js'

/**
 * Starts a worker thread named `name` running `source`, unreferenced. Messages go to
 * `onMessage`; an error, or an exit, goes to `onFailure` (which may be called for both).
 */
export function startScriptWorker<M>(source: string, name: string, onMessage: (m: M) => void, onFailure: (err: Error) => void): Worker {
  const threads = requireLazily('node:worker_threads') as typeof import('node:worker_threads')
  const worker = new threads.Worker(source, {
    eval: true, name, execArgv: [], env: threads.SHARE_ENV, stdout: true, stderr: true, trackUnmanagedFds: false,
  })
  worker.on('message', onMessage)
  worker.on('error', onFailure)
  worker.on('exit', (code) => onFailure(new Error(`the ${name} thread exited with code ${code}`)))
  // after the listeners: adding a 'message' listener refs the worker again
  worker.unref()
  return worker
}

/** A thread of the package that can be stopped while it holds no work. */
export interface StoppableThread {
  /** Whether it holds no work now (nothing queued, no state kept for a caller). */
  readonly idle: boolean
  /** Takes it out of its pool at once and ends it; resolves once the thread is gone. */
  stop(): Promise<void>
}

/** The running threads, each with its timer while idle. */
const live = new Map<StoppableThread, ReturnType<typeof setTimeout> | undefined>()
/** How long a thread may stay idle before it is ended, in ms (see {@link idleChanged}). */
let idleLimit = 10_000

/** Counts `thread` among the running threads (see {@link stopIdleThreads}); `false` takes it out. */
export function trackThread(thread: StoppableThread, tracked = true): void {
  if (tracked) {
    if (!live.has(thread)) live.set(thread, undefined)
    return
  }
  clearTimeout(live.get(thread))
  live.delete(thread)
}

/**
 * Called whenever `thread` may have become idle or busy. An idle thread is ended once it has
 * been idle for {@link idleLimit} ms, so that a long-running process that copied something once
 * gets the threads' memory back (some 20-30 MiB each after a copy of large layers); the timer
 * does not keep the process alive.
 */
export function idleChanged(thread: StoppableThread): void {
  if (!live.has(thread)) return
  clearTimeout(live.get(thread))
  let timer: ReturnType<typeof setTimeout> | undefined
  if (thread.idle) {
    timer = setTimeout(() => {
      if (live.get(thread) === timer && thread.idle) void thread.stop()
    }, idleLimit)
    timer.unref()
  }
  live.set(thread, timer)
}

/** Sets how long an idle thread lives on, in ms (for tests); returns the previous value. */
export function setIdleLimit(ms: number): number {
  const previous = idleLimit
  idleLimit = ms
  return previous
}

/** How many threads of the package run now (for tests). */
export function runningThreads(): number {
  return live.size
}

/**
 * Ends every thread of the package that holds no work, all at once; the next job starts a new
 * one. A process that is done with its work calls it before it exits: Node.js would otherwise
 * end the threads at exit, one after the other (each takes some 10 ms to tear down its heap),
 * while here they do it in parallel. Busy threads are left alone.
 */
export async function stopIdleThreads(): Promise<void> {
  await Promise.all([...live.keys()].filter((t) => t.idle).map((t) => t.stop()))
}
