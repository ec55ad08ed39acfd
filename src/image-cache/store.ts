// A content store over the cache's blobs, after containerd's local store (what linuxkit hands
// to buildkit): writers stream into `ingest/<sha256(ref)>/data` and commit, which checks the size
// and digest and renames the data into `blobs/`. Unlike containerd's, a writer's ref is locked
// across processes (a lock file that dies with its holder), a delete refuses blobs an image
// still uses, and abandoned ingests are cleaned by gc.
import { createHash, type Hash } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { chmod, mkdir, open, readFile, readdir, rename, rm, stat, writeFile, type FileHandle } from 'node:fs/promises'
import { join } from 'node:path'
import type { Readable } from 'node:stream'
import debug from 'debug'
import { type Digest, digestFrom, digestOf, parseDigest } from '../digest.js'
import { DigestMismatchError, ImageError, errnoCode } from '../errors.js'
import { CHUNK, blobPath, openVerifiedBlob, reachableBlobs } from './blobs.js'
import { updateIndex } from './index-file.js'
import { lockAbandoned, tryFileLock } from '../file-lock.js'
import { entryName } from './names.js'

const log = debug('blobcache:image-cache:store')

/** A commit found the content already stored (containerd's ErrAlreadyExists). Code `ALREADY_EXISTS`. */
export class AlreadyExistsError extends ImageError {
  override name = 'AlreadyExistsError'
  constructor(readonly digest: Digest) {
    super('ALREADY_EXISTS', `content ${digest}: already exists`)
  }
}

/** What the store knows about a blob. */
export interface ContentInfo {
  digest: Digest
  size: number
  createdAt: Date
  updatedAt: Date
}

/** The state of an ingest (a write not yet committed). */
export interface IngestStatus {
  ref: string
  /** Bytes written so far. */
  offset: number
  /** The expected total, 0 when unknown. */
  total: number
  startedAt: Date
  updatedAt: Date
}

/** Options of {@link ContentStore.writer}. */
export interface WriterOptions {
  /** Names the ingest; a writer reopened with the same ref resumes it. Required. */
  ref: string
  /** The expected size, recorded for status; 0 or undefined when unknown. */
  total?: number
  /** The digest the content will have: if the store holds it already, opening fails `ALREADY_EXISTS`. */
  expected?: Digest
}

const ALGORITHMS = ['sha256', 'sha512'] as const

/** The content store of an image cache directory. */
export class ContentStore {
  constructor(readonly root: string) {}

  #ingestDir(ref: string): string {
    if (typeof ref !== 'string' || ref === '') throw new ImageError('REFERENCE_INVALID', 'an ingest needs a ref')
    return join(this.root, 'ingest', digestOf(ref).slice('sha256:'.length))
  }

  /** Size and times of a stored blob; `BLOB_UNKNOWN` when it is not stored. */
  async info(digest: Digest): Promise<ContentInfo> {
    const d = parseDigest(digest)
    try {
      const s = await stat(blobPath(this.root, d))
      return { digest: d, size: s.size, createdAt: s.birthtime.getTime() ? s.birthtime : s.ctime, updatedAt: s.mtime }
    } catch (err) {
      if (errnoCode(err) === 'ENOENT') throw new ImageError('BLOB_UNKNOWN', `content ${d}: not found`, { cause: err })
      throw err
    }
  }

  /** Every stored blob (temporary files excluded), sorted by digest. */
  async list(): Promise<ContentInfo[]> {
    const out: ContentInfo[] = []
    for (const alg of ALGORITHMS) {
      const names = await readdir(join(this.root, 'blobs', alg)).catch(() => [] as string[])
      for (const name of names.sort()) {
        let digest: Digest
        try {
          digest = digestFrom(alg, name)
        } catch {
          continue // temp files and strays
        }
        try {
          out.push(await this.info(digest))
        } catch (err) {
          if ((err as ImageError).code !== 'BLOB_UNKNOWN') throw err
        }
      }
    }
    return out
  }

  /** Opens a stored blob, verified as it streams (see getContent). */
  async reader(digest: Digest, opts: { signal?: AbortSignal } = {}): Promise<{ stream: Readable; size: number }> {
    return openVerifiedBlob(this.root, parseDigest(digest), opts)
  }

  /**
   * Deletes a stored blob. Refuses (`DENIED`) a blob that an image named in index.json still
   * reaches; `BLOB_UNKNOWN` when it is not stored.
   */
  async delete(digest: Digest): Promise<void> {
    const d = parseDigest(digest)
    await updateIndex(this.root, async (index) => {
      const users = []
      for (const root of index.manifests) {
        if ((await reachableBlobs(this.root, [root])).has(d)) users.push(entryName(root) ?? root.digest)
      }
      if (users.length) throw new ImageError('DENIED', `content ${d} is used by ${users.join(', ')}`)
      try {
        await rm(blobPath(this.root, d))
      } catch (err) {
        if (errnoCode(err) === 'ENOENT') throw new ImageError('BLOB_UNKNOWN', `content ${d}: not found`, { cause: err })
        throw err
      }
      return { result: undefined }
    })
    log('deleted %s', d)
  }

  /**
   * Opens a writer for the ingest `ref`, resuming what an earlier writer of that ref left. Fails
   * `ALREADY_EXISTS` when `expected` is stored already, and `DENIED` while another live writer
   * (in any process) has the ref open.
   */
  async writer(opts: WriterOptions): Promise<ContentWriter> {
    const dir = this.#ingestDir(opts.ref)
    if (opts.expected) {
      const d = parseDigest(opts.expected)
      if ((await stat(blobPath(this.root, d)).catch(() => undefined))?.isFile()) throw new AlreadyExistsError(d)
    }
    await mkdir(dir, { recursive: true })
    const release = await tryFileLock(join(dir, 'lock'))
    if (!release) throw new ImageError('DENIED', `ingest ${JSON.stringify(opts.ref)} is open in another writer`)
    try {
      const now = String(Date.now())
      await writeFile(join(dir, 'ref'), opts.ref)
      if (!(await stat(join(dir, 'startedat')).catch(() => undefined))) await writeFile(join(dir, 'startedat'), now)
      await writeFile(join(dir, 'updatedat'), now)
      await writeFile(join(dir, 'total'), String(opts.total ?? 0))
      // resume: hash what is there already
      const hash = createHash('sha256')
      let offset = 0
      const existing = await stat(join(dir, 'data')).catch(() => undefined)
      if (existing) {
        for await (const chunk of createReadStream(join(dir, 'data'), { highWaterMark: CHUNK })) {
          hash.update(chunk as Buffer)
          offset += (chunk as Buffer).length
        }
      }
      const fh = await open(join(dir, 'data'), 'a', 0o644)
      return new ContentWriter(this.root, dir, opts.ref, opts.total ?? 0, fh, hash, offset, release)
    } catch (err) {
      await release()
      throw err
    }
  }

  /** The status of an ingest; `BLOB_UNKNOWN` when there is none. */
  async status(ref: string): Promise<IngestStatus> {
    return readStatus(this.#ingestDir(ref))
  }

  /** Every ingest under way or abandoned. */
  async ingests(): Promise<IngestStatus[]> {
    const names = await readdir(join(this.root, 'ingest')).catch(() => [] as string[])
    const out: IngestStatus[] = []
    for (const n of names.sort()) {
      try {
        out.push(await readStatus(join(this.root, 'ingest', n)))
      } catch {
        // half-created or being removed
      }
    }
    return out
  }

  /** Removes an ingest that no live writer holds. */
  async abort(ref: string): Promise<void> {
    const dir = this.#ingestDir(ref)
    const release = await tryFileLock(join(dir, 'lock')).catch(() => undefined)
    if (!release) throw new ImageError('DENIED', `ingest ${JSON.stringify(ref)} is open in another writer`)
    await rm(dir, { recursive: true, force: true })
  }

  /** Removes ingests whose writer is gone and that were not updated for `olderThanMs`. Resolves how many. */
  async removeAbandonedIngests(olderThanMs: number): Promise<number> {
    const names = await readdir(join(this.root, 'ingest')).catch(() => [] as string[])
    let removed = 0
    for (const n of names) {
      const dir = join(this.root, 'ingest', n)
      const updated = Number(await readFile(join(dir, 'updatedat'), 'utf8').catch(() => '0'))
      const mtime = (await stat(dir).catch(() => undefined))?.mtimeMs ?? 0
      if (Date.now() - Math.max(updated, mtime) < olderThanMs) continue
      if (!(await lockAbandoned(join(dir, 'lock')))) continue
      await rm(dir, { recursive: true, force: true })
      removed++
    }
    return removed
  }
}

async function readStatus(dir: string): Promise<IngestStatus> {
  let ref: string
  try {
    ref = await readFile(join(dir, 'ref'), 'utf8')
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') throw new ImageError('BLOB_UNKNOWN', `no ingest at ${dir}`, { cause: err })
    throw err
  }
  const num = async (f: string) => Number(await readFile(join(dir, f), 'utf8').catch(() => '0')) || 0
  const offset = (await stat(join(dir, 'data')).catch(() => undefined))?.size ?? 0
  return { ref, offset, total: await num('total'), startedAt: new Date(await num('startedat')), updatedAt: new Date(await num('updatedat')) }
}

/** An open ingest. Write, then commit (or close to keep it for later, or abort via the store). */
export class ContentWriter {
  #closed = false
  #lastTouch = Date.now()

  constructor(
    readonly root: string,
    readonly dir: string,
    readonly ref: string,
    readonly total: number,
    readonly fh: FileHandle,
    readonly hash: Hash,
    public offset: number,
    readonly release: () => Promise<void>,
  ) {}

  /** Appends bytes. */
  async write(chunk: Buffer | Uint8Array): Promise<void> {
    if (this.#closed) throw new ImageError('CACHE_INVALID', `writer ${this.ref} is closed`)
    await this.fh.write(chunk)
    this.hash.update(chunk)
    this.offset += chunk.length
    if (Date.now() - this.#lastTouch > 1000) {
      this.#lastTouch = Date.now()
      await writeFile(join(this.dir, 'updatedat'), String(this.#lastTouch))
    }
  }

  /** The digest of the bytes written so far. */
  digest(): Digest {
    return `sha256:${this.hash.copy().digest('hex')}` as Digest
  }

  /** The ingest's status. */
  async status(): Promise<IngestStatus> {
    return readStatus(this.dir)
  }

  /**
   * Commits the content: `size` (when > 0) and `expected` (when given) MUST match what was
   * written (`SIZE_INVALID`, `DIGEST_INVALID`; the ingest is kept). The data is fsynced, renamed to
   * `blobs/sha256/<hex>` and made read-only, and the ingest is removed. If the store holds the
   * digest already, the ingest is removed and the call fails `ALREADY_EXISTS`.
   */
  async commit(size: number, expected?: Digest): Promise<Digest> {
    if (this.#closed) throw new ImageError('CACHE_INVALID', `writer ${this.ref} is closed`)
    const digest = this.digest()
    if (size > 0 && size !== this.offset) throw new ImageError('SIZE_INVALID', `commit of ${this.ref}: ${this.offset} bytes written, expected ${size}`)
    if (expected && parseDigest(expected) !== digest) throw new DigestMismatchError(expected, digest)
    await this.fh.sync()
    this.#closed = true
    await this.fh.close()
    const target = blobPath(this.root, digest)
    try {
      if ((await stat(target).catch(() => undefined))?.isFile()) throw new AlreadyExistsError(digest)
      await mkdir(join(this.root, 'blobs', 'sha256'), { recursive: true })
      await chmod(join(this.dir, 'data'), 0o444)
      await rename(join(this.dir, 'data'), target)
      log('committed %s (%d bytes) from %s', digest, this.offset, this.ref)
      return digest
    } finally {
      await rm(this.dir, { recursive: true, force: true })
      await this.release()
    }
  }

  /** Closes the writer and keeps the ingest, so a writer of the same ref can resume it. */
  async close(): Promise<void> {
    if (this.#closed) return
    await this.#finish()
  }

  async #finish(): Promise<void> {
    this.#closed = true
    try {
      await this.fh.close()
    } finally {
      await this.release()
    }
  }
}
