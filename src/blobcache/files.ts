// File-level helpers of the blob cache: entry names, temporary names, atomic small writes and
// best-effort touches and removals. Every name joined into a path here comes from a validated
// Digest, so nothing can point outside the cache directory.
import { randomBytes } from 'node:crypto'
import { constants } from 'node:fs'
import { lstat, open, rename, rm } from 'node:fs/promises'
import { basename, dirname, join } from 'node:path'
import { type Digest, isDigest } from '../digest.js'
import { errnoCode } from '../errors.js'

/** Prefix of every temporary file and lock the cache creates; such files are never content. */
export const TEMP_PREFIX = '.tmp-'

/** Chunk size of the file streams the cache opens (1 MiB). */
export const HIGH_WATER_MARK = 1 << 20

/** Flags for opening an entry for reading: a symbolic link fails (ELOOP) instead of being followed. */
export const READ_NOFOLLOW = constants.O_RDONLY | constants.O_NOFOLLOW

/** Mode of the files the cache creates. Blobs are content-addressed public data. */
export const FILE_MODE = 0o644

/** The file name of a blob entry: `<digest>`, or `<digest>.config` for an image config. */
export function entryName(digest: Digest, isConfig = false): string {
  return isConfig ? `${digest}.config` : digest
}

/** The kinds of files found in a cache directory. */
export type EntryKind = 'blob' | 'config' | 'note' | 'temp' | 'other'

const DIGEST_PART = '(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})'
const NAMED = new RegExp(`^${DIGEST_PART}(\\.config|\\.compressed|\\.decompressed)?$`)
/** Go's os.CreateTemp(dir, base) names: the final base name followed by random decimal digits. */
const GO_TEMP = new RegExp(`^${DIGEST_PART}(\\.config)?[0-9]+$`)

/** Classifies a file name of a cache directory and extracts its digest. */
export function classifyName(name: string): { kind: EntryKind; digest?: Digest } {
  if (name.startsWith(TEMP_PREFIX) || GO_TEMP.test(name)) return { kind: 'temp' }
  const m = NAMED.exec(name)
  if (!m || !isDigest(m[1])) return { kind: 'other' }
  const digest = m[1]
  switch (m[2]) {
    case '.config':
      return { kind: 'config', digest }
    case '.compressed':
    case '.decompressed':
      return { kind: 'note', digest }
    default:
      return { kind: 'blob', digest }
  }
}

/** A fresh temporary path in `dir` for a file that will become `base`. */
export function tempPath(dir: string, base: string): string {
  return join(dir, `${TEMP_PREFIX}${base}-${randomBytes(6).toString('hex')}`)
}

/**
 * Replaces `path` with `data` atomically (temp file in the same directory, fdatasync, rename):
 * a reader sees the old bytes or the new ones, never a mix. A failure removes the temp file and
 * rejects.
 */
export async function atomicWriteFile(path: string, data: string | Buffer): Promise<void> {
  const tmp = tempPath(dirname(path), basename(path))
  try {
    const fh = await open(tmp, 'wx', FILE_MODE)
    try {
      await fh.writeFile(data)
      await fh.datasync()
    } finally {
      await fh.close()
    }
    await rename(tmp, path)
  } catch (err) {
    await rm(tmp, { force: true }).catch(() => {})
    throw err
  }
}

/** Removes a file, ignoring every error (it is gone, or cannot be helped). */
export async function removeQuietly(path: string): Promise<void> {
  await rm(path, { force: true }).catch(() => {})
}

/**
 * Marks an entry as used now, so that LRU pruning works on file systems mounted `noatime`,
 * keeping its verification stamp (see stamp.ts). Best effort.
 */
export { touchEntry as touch } from './stamp.js'

/**
 * The size of the regular file at `path`, or undefined when there is none. A symbolic link is
 * not followed and counts as none, so no entry can lead out of the cache directory. Other
 * errors throw.
 */
export async function fileSize(path: string): Promise<number | undefined> {
  try {
    const s = await lstat(path)
    return s.isFile() ? s.size : undefined
  } catch (err) {
    const code = errnoCode(err)
    if (code === 'ENOENT' || code === 'ENOTDIR') return undefined
    throw err
  }
}

/** True when a regular file exists at `path`; any error reads as false. */
export async function fileExists(path: string): Promise<boolean> {
  return (await fileSize(path).catch(() => undefined)) !== undefined
}
