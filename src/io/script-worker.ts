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
