// The note files that link a layer's compressed and uncompressed forms, in the containers/image
// format: `<U>.compressed` lists the compressed variants of the uncompressed blob U, one
// `<digest> <algorithm>` a line (a lone `<digest>` is the legacy form and means gzip);
// `<C>.decompressed` holds the digest of the decompressed form of C. Neither ends in a newline.
// Updates of `.compressed` are read-modify-write under a lock, so concurrent writers (threads or
// processes) merge their entries instead of overwriting each other.
import { readFile, rm } from 'node:fs/promises'
import { join } from 'node:path'
import debug from 'debug'
import { type Digest, isDigest } from '../digest.js'
import { errnoCode } from '../errors.js'
import type { DetectedAlgorithm } from '../types.js'
import { TEMP_PREFIX, atomicWriteFile } from './files.js'
import { type FileLockOptions, withFileLock } from '../file-lock.js'

const log = debug('blobcache:blobcache:notes')

/** Algorithms a `.compressed` note may name and blobcache understands. */
export const NOTE_ALGORITHMS: readonly DetectedAlgorithm[] = ['gzip', 'zstd', 'bzip2', 'xz']

/** True when a note's algorithm name is one blobcache understands. */
export function isNoteAlgorithm(s: string): s is DetectedAlgorithm {
  return (NOTE_ALGORITHMS as readonly string[]).includes(s)
}

/** The name of the note listing the compressed variants of `uncompressed`. */
export function compressedNoteName(uncompressed: Digest): string {
  return `${uncompressed}.compressed`
}

/** The name of the note naming the decompressed form of `compressed`. */
export function decompressedNoteName(compressed: Digest): string {
  return `${compressed}.decompressed`
}

/**
 * Lock settings of note updates: holders keep a note's lock for milliseconds, so a lock older
 * than 10 s (on another host, where its holder's pid cannot be checked) is taken as abandoned.
 */
const NOTE_LOCK: FileLockOptions = { staleMs: 10_000, timeoutMs: 30_000 }

/** The lock file guarding updates of the note `name`. */
export function noteLockName(name: string): string {
  return `${TEMP_PREFIX}${name}.lock`
}

/**
 * Parses a `.compressed` note into digest → algorithm name. Lines are trimmed, blank lines
 * skipped, and each split at its first space; a line without an algorithm means gzip. Lines
 * with an invalid digest are dropped. Algorithm names blobcache does not know are kept (so that
 * a rewrite preserves them) but {@link knownVariants} skips them.
 */
export function parseCompressedNote(text: string): Map<Digest, string> {
  const out = new Map<Digest, string>()
  for (const raw of text.split('\n')) {
    const line = raw.trim()
    if (line === '') continue
    const space = line.indexOf(' ')
    const digest = space < 0 ? line : line.slice(0, space)
    const algorithm = space < 0 ? 'gzip' : line.slice(space + 1).trim()
    if (!isDigest(digest) || algorithm === '') continue
    out.set(digest, algorithm)
  }
  return out
}

/**
 * Formats a `.compressed` note. A single gzip variant is written in the legacy one-line form, so
 * that readers of the old format (buildah 1.28) understand it; anything else is one
 * `<digest> <algorithm>` per line, sorted by digest. No trailing newline.
 */
export function formatCompressedNote(variants: Map<Digest, string>): string {
  const entries = [...variants].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
  if (entries.length === 1 && entries[0][1] === 'gzip') return entries[0][0]
  return entries.map(([d, alg]) => `${d} ${alg}`).join('\n')
}

/** The variants of a parsed note whose algorithm blobcache understands. */
export function knownVariants(note: Map<Digest, string>): [Digest, DetectedAlgorithm][] {
  return [...note].filter((e): e is [Digest, DetectedAlgorithm] => isNoteAlgorithm(e[1]))
}

/**
 * Reads the `.compressed` note of `uncompressed` in `dir`. A missing note is an empty map; any
 * other read error rejects.
 */
export async function readCompressedNote(dir: string, uncompressed: Digest): Promise<Map<Digest, string>> {
  try {
    return parseCompressedNote(await readFile(join(dir, compressedNoteName(uncompressed)), 'utf8'))
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return new Map()
    throw err
  }
}

/**
 * Records that `compressed` is the `algorithm` variant of `uncompressed`, merging with what the
 * note already holds. Concurrent callers, in this process or others, MUST NOT lose entries: the
 * update runs under the note's lock and replaces the note atomically. Nothing is written when
 * the entry is already there.
 */
export async function addCompressedVariant(
  dir: string,
  uncompressed: Digest,
  compressed: Digest,
  algorithm: DetectedAlgorithm,
  opts: FileLockOptions = {},
): Promise<void> {
  const name = compressedNoteName(uncompressed)
  await withFileLock(
    join(dir, noteLockName(name)),
    async () => {
      const note = await readCompressedNote(dir, uncompressed)
      if (note.get(compressed) === algorithm) return
      note.set(compressed, algorithm)
      await atomicWriteFile(join(dir, name), formatCompressedNote(note))
      log('noted %s: %s variant %s', name, algorithm, compressed)
    },
    { ...NOTE_LOCK, ...opts },
  )
}

/**
 * Removes variants from the `.compressed` note of `uncompressed` (under its lock), deleting the
 * note when none is left. Used when variants are evicted.
 */
export async function removeCompressedVariants(dir: string, uncompressed: Digest, drop: (d: Digest) => boolean | Promise<boolean>): Promise<boolean> {
  const name = compressedNoteName(uncompressed)
  return withFileLock(join(dir, noteLockName(name)), async () => {
    const note = await readCompressedNote(dir, uncompressed)
    let changed = false
    for (const d of [...note.keys()]) {
      if (await drop(d)) {
        note.delete(d)
        changed = true
      }
    }
    if (!changed) return false
    if (note.size === 0) await rm(join(dir, name), { force: true })
    else await atomicWriteFile(join(dir, name), formatCompressedNote(note))
    return true
  }, NOTE_LOCK)
}

/**
 * Reads the `.decompressed` note of `compressed`: the digest of its decompressed form, or
 * undefined when the note is missing or does not hold a valid digest.
 */
export async function readDecompressedNote(dir: string, compressed: Digest): Promise<Digest | undefined> {
  let text: string
  try {
    text = await readFile(join(dir, decompressedNoteName(compressed)), 'utf8')
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return undefined
    throw err
  }
  const d = text.trim()
  return isDigest(d) ? d : undefined
}

/** Writes the `.decompressed` note of `compressed` (atomically; skipped when already right). */
export async function writeDecompressedNote(dir: string, compressed: Digest, uncompressed: Digest): Promise<void> {
  if ((await readDecompressedNote(dir, compressed).catch(() => undefined)) === uncompressed) return
  await atomicWriteFile(join(dir, decompressedNoteName(compressed)), uncompressed)
  log('noted %s.decompressed: %s', compressed, uncompressed)
}
