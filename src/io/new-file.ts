// A write stream on a file that exists before the stream is returned. `createWriteStream(path)`
// opens its file in the background: when a pipeline into it fails first, the pipeline settles,
// the caller removes the path, and only then does the open land and create the file again, a
// leftover nothing removes. Opening first (and giving the stream the descriptor) closes that
// window: once this resolves, removing the path after a failure removes the file for good.
import type { WriteStream } from 'node:fs'
import { open } from 'node:fs/promises'

/** Options of {@link openNewFile}. */
export interface NewFileOptions {
  /** Mode of the new file (default 0o644, before the umask). */
  mode?: number
  /** Buffer size of the stream (default 1 MiB). */
  highWaterMark?: number
}

/**
 * Creates `path`, which MUST NOT exist (`wx`: an existing file or a symbolic link there fails
 * with `EEXIST`), and resolves a write stream on it that closes the descriptor when it ends or
 * is destroyed.
 */
export async function openNewFile(path: string, opts: NewFileOptions = {}): Promise<WriteStream> {
  const handle = await open(path, 'wx', opts.mode ?? 0o644)
  return handle.createWriteStream({ highWaterMark: opts.highWaterMark ?? 1 << 20 })
}
