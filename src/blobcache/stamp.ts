// Verification stamps. An entry is verified (hashed to its name) when it is written; a later hit
// that hands the file out by path (to be copied with fs.copyFile, unread) need not hash it again,
// provided nothing has written to it since. The proof is kept in the entry's mtime, where it
// costs no extra file and leaves the directory byte-compatible with containers/image: when an
// entry is stamped, the microseconds of its mtime are set to a keyed hash of (name, inode,
// size, mtime seconds). Any write to the file sets the mtime to the clock, which matches the
// stamp with a chance of one in a million; a file renamed from another entry (another name) or
// copied (another inode) does not match either. An entry without a valid stamp is hashed, and
// stamped when it matches. File systems that keep mtimes coarser than a microsecond lose the
// stamp, which only means hashing every time.
//
// The stamp guards against accidents (a tool or person writing to an entry, a truncation, a
// swap), not against someone who can write the directory and forge mtimes on purpose.
import { createHash } from 'node:crypto'
import { lstat, utimes } from 'node:fs/promises'
import { basename } from 'node:path'

const NS_PER_SECOND = 1_000_000_000n
const MICROS_PER_SECOND = 1_000_000

/** The microseconds that mark `name` verified with this inode, size and mtime second. */
function stampMicros(name: string, ino: bigint, size: bigint, seconds: bigint): number {
  const h = createHash('sha256').update(`blobcache-verified\0${name}\0${ino}\0${size}\0${seconds}`).digest()
  return h.readUInt32BE(0) % MICROS_PER_SECOND
}

/** Splits a nanosecond mtime into whole seconds and whole microseconds. */
function split(mtimeNs: bigint): { seconds: bigint; micros: number } {
  const seconds = mtimeNs / NS_PER_SECOND
  return { seconds, micros: Math.floor(Number(mtimeNs % NS_PER_SECOND) / 1000) }
}

/** True when the regular file at `path` carries a valid stamp for its name. Errors: false. */
export async function hasVerifiedStamp(path: string): Promise<boolean> {
  try {
    const st = await lstat(path, { bigint: true })
    if (!st.isFile()) return false
    const { seconds, micros } = split(st.mtimeNs)
    return micros === stampMicros(basename(path), st.ino, st.size, seconds)
  } catch {
    return false
  }
}

/**
 * Stamps the file at `path` as verified now (its mtime) and used now (its atime). The caller
 * MUST have just verified that the file's bytes hash to its name; `size`, when given, is the
 * size that was verified, and a file of another size is left unstamped. Best effort.
 */
export async function stampVerified(path: string, size?: number, when = Date.now()): Promise<void> {
  try {
    const st = await lstat(path, { bigint: true })
    if (!st.isFile() || (size !== undefined && st.size !== BigInt(size))) return
    const seconds = BigInt(Math.floor(when / 1000))
    const micros = stampMicros(basename(path), st.ino, st.size, seconds)
    // half a microsecond more: a time in seconds (a double) is off by up to ~0.25 µs, and the
    // kernel's µs or ns is then truncated, so the whole microsecond survives either way
    await utimes(path, when / 1000, Number(seconds) + (micros + 0.5) / MICROS_PER_SECOND)
  } catch {
    // a missing or read-only entry keeps what it has
  }
}

/**
 * Marks an entry as used now, for LRU pruning (which takes the later of mtime and atime): a
 * stamped entry is stamped again with the current time, any other file gets atime now and
 * keeps its mtime, so that using a file never makes it look verified. Best effort.
 */
export async function touchEntry(path: string): Promise<void> {
  try {
    const st = await lstat(path, { bigint: true })
    if (!st.isFile()) return
    const { seconds, micros } = split(st.mtimeNs)
    if (micros === stampMicros(basename(path), st.ino, st.size, seconds)) return await stampVerified(path, Number(st.size))
    await utimes(path, Date.now() / 1000, Number(st.mtimeNs) / 1e9)
  } catch {
    // best effort
  }
}
