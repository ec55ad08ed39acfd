// One write-behind job of the shared tier: bring the tier's entry of a local cache entry up to
// date. Read what the local directory knows (size, compression, notes); if the tier's entry
// already covers it, stop; else make sure the blob is in the repository (HEAD, cross-repository
// mount, or upload), make sure the empty config is, and write the merged entry manifest with
// read-merge-write-verify rounds until it holds our notes (see writeManifest).
import { open } from 'node:fs/promises'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import debug from 'debug'
import type { Digest } from '../../digest.js'
import { detectCompression, PEEK_BYTES } from '../../compression.js'
import { errnoCode } from '../../errors.js'
import { pushManifest } from '../../registry/manifests.js'
import { headBlob, mountBlob, uploadBlob } from '../../registry/upload.js'
import { HIGH_WATER_MARK, READ_NOFOLLOW } from '../files.js'
import { readCompressedNote, readDecompressedNote } from '../notes.js'
import { NotConvergedError, type TierCore, Watchdog } from './core.js'
import {
  ENTRY_MANIFEST_MEDIA_TYPE, type SharedEntry, type SharedKind, entryCovers, entryTag, formatEntryManifest, mergeEntries,
} from './format.js'

const log = debug('blobcache:blobcache:shared:write')

/** Manifest writes per job before it gives up (the job itself may then be retried). */
export const MAX_WRITE_ROUNDS = 5

/** Longest an upload may go without reading a byte of the local file, at least (ms). */
const UPLOAD_IDLE_MIN = 20_000

/** A local cache entry to bring into the tier. */
export interface WriteJob {
  dir: string
  /** `<digest>` or `<digest>.config`. */
  name: string
  digest: Digest
  kind: SharedKind
  /** A repository of the tier's registry known to hold the blob. */
  mountFrom?: string
}

/** What a job did: sent the bytes, mounted them, only wrote notes, or found nothing to do. */
export type WriteOutcome = 'uploaded' | 'mounted' | 'merged' | 'skipped'

/**
 * What the local directory knows of the job's entry, or undefined when the file is gone. The
 * compression comes from the file's first bytes, the notes from its note files.
 */
export async function localEntry(job: WriteJob): Promise<SharedEntry | undefined> {
  let handle
  try {
    handle = await open(join(job.dir, job.name), READ_NOFOLLOW)
  } catch (err) {
    const code = errnoCode(err)
    if (code === 'ENOENT' || code === 'ELOOP' || code === 'ENOTDIR') return undefined
    throw err
  }
  let size: number
  let head: Buffer
  try {
    const st = await handle.stat()
    if (!st.isFile()) return undefined
    size = st.size
    head = Buffer.alloc(PEEK_BYTES)
    head = head.subarray(0, (await handle.read(head, 0, PEEK_BYTES, 0)).bytesRead)
  } finally {
    await handle.close()
  }
  const entry: SharedEntry = { digest: job.digest, size, kind: job.kind, compressed: new Map() }
  const compression = job.kind === 'layer' ? detectCompression(head) : null
  if (compression) entry.compression = compression
  const decompressed = await readDecompressedNote(job.dir, job.digest)
  if (decompressed && decompressed !== job.digest) entry.decompressed = decompressed
  for (const [d, alg] of await readCompressedNote(job.dir, job.digest)) if (d !== job.digest) entry.compressed.set(d, alg)
  return entry
}

/**
 * Brings the tier's entry of `job` up to date with `ours` (see the module comment). Rejects with
 * the failure (the caller counts it), or with `signal.reason`. `onWritten` is called once the
 * entry has been written and read back, before the delayed checks (the caller's queue may
 * start another job meanwhile).
 */
export async function writeEntry(
  core: TierCore,
  job: WriteJob,
  ours: SharedEntry,
  signal: AbortSignal,
  onWritten: () => void = () => {},
): Promise<WriteOutcome> {
  const current = await core.readEntry(job.digest, signal)
  if (current && entryCovers(current, ours)) {
    log('%s: the tier has it all', job.digest)
    return 'skipped'
  }
  let outcome: WriteOutcome = 'merged'
  // an entry of the right size proves the blob is there: the registry checked it when the entry was written
  if (!current || current.size !== ours.size) outcome = await ensureBlob(core, job, ours.size, signal)
  await core.ensureEmptyConfig(signal)
  await writeManifest(core, ours, signal, onWritten)
  return outcome
}

/** Puts the blob into the repository unless it is there: HEAD, then a mount, then an upload. */
async function ensureBlob(core: TierCore, job: WriteJob, size: number, signal: AbortSignal): Promise<WriteOutcome> {
  const { client, repository } = core
  const have = await headBlob(client, repository, job.digest, core.timed(signal), true)
  if (have !== undefined) {
    if (have >= 0 && have !== size) log('%s: the registry reports %d bytes, the local entry has %d', job.digest, have, size)
    return 'merged'
  }
  if (job.mountFrom && job.mountFrom !== repository) {
    if (await mountBlob(client, repository, job.digest, job.mountFrom, core.timed(signal))) return 'mounted'
  }
  const handle = await open(join(job.dir, job.name), READ_NOFOLLOW)
  const watchdog = new Watchdog(Math.max(UPLOAD_IDLE_MIN, core.timeoutMs * 4), signal)
  const file = handle.createReadStream({ highWaterMark: HIGH_WATER_MARK })
  file.on('data', () => watchdog.poke())
  try {
    // the registry verifies the digest (and the size) before it commits the blob
    await uploadBlob(client, repository, file, { digest: job.digest, size }, { signal: watchdog.signal })
  } catch (err) {
    if (signal.aborted) throw signal.reason
    throw watchdog.signal.aborted ? watchdog.signal.reason : err
  } finally {
    watchdog.stop()
    file.destroy()
  }
  core.counters.bytesUploaded += size
  log('uploaded %s (%d bytes) to %s', job.digest, size, core.name)
  return 'uploaded'
}

/** A delay of `min`..`max` ms, random. */
function jitter(min: number, max: number): number {
  return Math.round(min + Math.random() * (max - min))
}

/**
 * Writes the entry manifest until it holds our notes. Each round reads what the tier has right
 * before writing (so the window in which another writer can slip in is one round trip), PUTs
 * the merge by tag and reads it back; if the read-back covers ours, it checks again after short
 * jittered delays (see {@link recheck}): a writer that read before our PUT may have overwritten
 * us, and then its notes merged with ours are written in the next round. At most
 * {@link MAX_WRITE_ROUNDS} rounds, with jittered backoff. Resolves the entry the tier holds
 * (also remembered for lookups).
 */
async function writeManifest(core: TierCore, ours: SharedEntry, signal: AbortSignal, onWritten: () => void): Promise<SharedEntry> {
  const tag = entryTag(ours.digest)!
  for (let round = 1; round <= MAX_WRITE_ROUNDS; round++) {
    const started = Date.now()
    let current: SharedEntry | null | undefined = await core.readEntry(ours.digest, signal)
    if (!current || !entryCovers(current, ours)) {
      const merged = current ? mergeEntries(current, ours) : ours
      await pushManifest(core.client, core.repository, tag, formatEntryManifest(merged), ENTRY_MANIFEST_MEDIA_TYPE, core.timed(signal))
      current = await core.readEntry(ours.digest, signal)
    }
    if (current && entryCovers(current, ours)) {
      onWritten()
      current = await recheck(core, ours, Date.now() - started, signal)
      if (current) {
        core.remember(current)
        log('wrote the entry %s (round %d)', tag, round)
        return current
      }
    }
    log('the entry %s lost our notes (round %d); merging again', tag, round)
    await sleep(jitter(10, 40 * 2 ** round), undefined, { signal })
  }
  throw new NotConvergedError(ours.digest, MAX_WRITE_ROUNDS)
}

/**
 * Checks, twice, that the entry still covers ours after another writer could have overwritten
 * it: first after 20-80 ms and at least twice `window` (the round's own read-to-write time,
 * about the time another writer takes from its read to its write), then after a further
 * 100-200 ms and at least four times `window`, for a writer slowed down more than we were.
 * Resolves the entry, or undefined once a check finds our notes gone.
 */
async function recheck(core: TierCore, ours: SharedEntry, window: number, signal: AbortSignal): Promise<SharedEntry | undefined> {
  let current: SharedEntry | undefined
  for (const delay of [Math.max(jitter(20, 80), 2 * window + jitter(0, 20)), Math.max(jitter(100, 200), 4 * window)]) {
    await sleep(delay, undefined, { signal })
    current = (await core.readEntry(ours.digest, signal)) ?? undefined
    if (!current || !entryCovers(current, ours)) return undefined
  }
  return current
}
