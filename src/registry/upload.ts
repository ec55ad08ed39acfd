import { createHash } from 'node:crypto'
import { type Readable, addAbortSignal } from 'node:stream'
import debug from 'debug'
import { type Digest, type DigestingStream, checkDigest, digestingStream, streamDigest } from '../digest.js'
import { ImageError } from '../errors.js'
import type { BlobInfo } from '../types.js'
import { repositoryScope } from './auth.js'
import { type RegistryClient, type RegistryResponse, discard, header } from './client.js'
import { type BodySink, Chunk } from './chunks.js'
import { RegistryError } from './errors.js'
import { isTransient, withRetry } from './retry.js'

const log = debug('blobcache:registry:upload')

/**
 * Default size of one upload chunk (PATCH). A blob no larger than this goes up in a single
 * PUT. Measured pushing 4 x 41 MiB layers to a local registry: 4 and 8 MiB chunks took ~10%
 * longer than 16 or 32 MiB, which performed alike; 16 MiB keeps peak memory lower (an upload
 * holds at most two chunks).
 */
export const DEFAULT_CHUNK_SIZE = 16 << 20

/** Options of {@link uploadBlob}. */
export interface UploadOptions {
  signal?: AbortSignal
  /** Bytes per PATCH; also the largest blob sent in one PUT. Default {@link DEFAULT_CHUNK_SIZE}. */
  chunkSize?: number
}

/**
 * Uploads a blob: POST to open a session, then the bytes in chunks, each PATCH retried from
 * the offset the registry reports after a failure, and a closing PUT `?digest=` carrying the
 * last chunk (so a small blob is one monolithic PUT). When the size is known, a PATCH starts as
 * soon as its chunk's first bytes are read and sends the rest as they come, so the registry is
 * kept busy from the start; with an unknown size each chunk is read whole first (only then is
 * it known not to be the last). A size that does not match `info` fails before the closing PUT;
 * a digest that does not match is refused by the registry at the closing PUT
 * (`DIGEST_INVALID`), which is what commits the blob, so such bytes are never stored (with a
 * {@link DigestingStream} the mismatch is caught before it). Without `info.digest` the bytes
 * are named by the stream's digest, or hashed here. On any failure the session is cancelled
 * (DELETE) and nothing is stored. Memory is bounded by two chunks (three with an unknown size).
 */
export async function uploadBlob(
  client: RegistryClient,
  repository: string,
  stream: Readable,
  info: BlobInfo,
  opts: UploadOptions = {},
): Promise<BlobInfo> {
  const { signal } = opts
  const chunkSize = opts.chunkSize ?? DEFAULT_CHUNK_SIZE
  // With a digest given, the registry verifies the bytes at the closing PUT (and refuses them
  // with DIGEST_INVALID); hashing them here too would only cost time, as containers/image knows.
  // A stream that hashes what it passes on (copyImage's) tells its digest for free: then a
  // mismatch is caught before the closing PUT, and an unknown digest needs no hashing here.
  const upstream = digestingStream(stream, info.digest)
  const hash = info.digest || upstream ? undefined : createHash('sha256')
  const scopes = [repositoryScope(repository, 'pull,push')]
  const what = info.digest ?? 'blob'
  const known = info.size >= 0
  let location: URL | undefined
  let bytes = 0

  const started = startUpload(client, repository, what, signal).then((url) => (location = url))
  // a session that cannot be opened ends the upload at once (the loop below throws its error),
  // rather than once the whole source has been read for nothing
  started.catch((err: Error) => stream.destroy(err))

  const patch = async (chunk: Chunk, start: number): Promise<void> => {
    let sent = 0
    await withRetry(
      async (attempt) => {
        if (attempt > 1) {
          await chunk.whenComplete()
          const st = await uploadStatus(client, repository, location!, what, signal)
          location = st.location
          sent = st.size - start
          if (sent < 0 || sent > chunk.capacity) {
            throw new ImageError('BLOB_UPLOAD_INVALID', `${client.registry}/${repository}: upload of ${what} is at byte ${st.size}, expected ${start}..${start + chunk.capacity}`)
          }
          if (sent === chunk.capacity) return
        }
        const from = sent
        const res = await client.send({
          method: 'PATCH',
          path: location!,
          repository,
          scopes,
          headers: { 'content-type': 'application/octet-stream', 'content-range': `${start + from}-${start + chunk.capacity - 1}` },
          body: chunk.complete ? chunk.from(from) : { length: chunk.capacity - from, write: (out: BodySink) => chunk.streamTo(out, from) },
          ok: [202, 204],
          kind: 'upload',
          action: `uploading ${what} (bytes ${start + from}-${start + chunk.capacity - 1})`,
          signal,
          retry: false,
        })
        location = nextLocation(res, location!)
        await discard(res.body)
      },
      // bytes that never came (the source failed) are not worth another attempt
      { ...client.retryPolicy, signal, what: `PATCH ${what}`, retryable: (err) => !chunk.failed && isTransient(err) },
    )
  }

  // PATCHes run one after another (a session takes its bytes in order); each waits for the one
  // before (the first for the POST). `last` is the newest, `beforeLast` the one queued before it.
  let last: Promise<void> = started.then(() => {})
  // awaited below, or by the first PATCH; until then its failure must not count as unhandled
  last.catch(() => {})
  let beforeLast: Promise<void> = Promise.resolve()
  let patches = 0
  const queuePatch = (chunk: Chunk, start: number) => {
    const p = last.then(() => patch(chunk, start))
    p.catch(() => {})
    beforeLast = patches++ > 0 ? last : Promise.resolve()
    last = p
  }

  let filling: Chunk | undefined
  let fillingStart = 0
  let held: Chunk | undefined
  let heldStart = 0
  try {
    const source = signal ? addAbortSignal(signal, stream) : stream
    for await (const data of source) {
      let buf = typeof data === 'string' ? Buffer.from(data) : (data as Buffer)
      bytes += buf.length
      if (known && bytes > info.size) throw new ImageError('SIZE_INVALID', `blob ${what}: more than the expected ${info.size} bytes`)
      if (hash) hash.update(buf)
      while (buf.length > 0) {
        if (!filling) {
          // Bounded memory: a chunk of a known size is sent while it fills, so it starts once the
          // PATCH before it is done; otherwise the next chunk is read while the last one is sent.
          if (patches > 0) await (known ? last : beforeLast)
          filling = new Chunk(known ? Math.min(chunkSize, info.size - fillingStart) : chunkSize)
          // known not to be the last: send it while it fills
          if (known && fillingStart + chunkSize < info.size) queuePatch(filling, fillingStart)
        }
        const take = Math.min(filling.capacity - filling.length, buf.length)
        filling.add(take === buf.length ? buf : buf.subarray(0, take))
        buf = buf.subarray(take)
        if (filling.complete) {
          const queued = known && fillingStart + chunkSize < info.size
          if (!queued) {
            // the last chunk, or (size unknown) perhaps the last: it waits for what comes next
            if (held) queuePatch(held, heldStart)
            held = filling
            heldStart = fillingStart
          }
          fillingStart += filling.length
          filling = undefined
        }
      }
    }
    if (filling && !known) {
      // the stream ended inside a chunk: the last one
      if (held) queuePatch(held, heldStart)
      held = filling
      heldStart = fillingStart
      filling = undefined
    }
    // with a known size, a chunk left unfilled means too few bytes (its PATCH fails with this too)
    if (known && bytes !== info.size) throw new ImageError('SIZE_INVALID', `blob ${what}: got ${bytes} bytes, expected ${info.size}`)
    await last
    let digest: Digest
    if (upstream) {
      const got = upstream[streamDigest]()
      checkDigest(got, { expected: info.digest })
      digest = got.digest
    } else digest = info.digest ?? (`sha256:${hash!.digest('hex')}` as Digest)
    const offset = held ? heldStart : 0
    await finishUpload(client, repository, location!, offset, digest, held, signal)
    log('uploaded %s to %s/%s (%d bytes, %d chunks)', digest, client.registry, repository, bytes, Math.ceil(bytes / chunkSize) || 1)
    return { digest, size: bytes, ...(info.mediaType ? { mediaType: info.mediaType } : {}) }
  } catch (err) {
    stream.destroy()
    filling?.fail(err as Error)
    // let the PATCHes settle first: the session URL the last one returns is the one that can cancel
    await last.catch(() => {})
    if (location) await cancelUpload(client, repository, location)
    if (signal?.aborted) throw signal.reason
    throw err
  }
}

async function startUpload(client: RegistryClient, repository: string, what: string, signal?: AbortSignal): Promise<URL> {
  const res = await client.send({
    method: 'POST',
    path: `/v2/${repository}/blobs/uploads/`,
    repository,
    scopes: [repositoryScope(repository, 'pull,push')],
    ok: [202],
    kind: 'upload',
    action: `starting the upload of ${what}`,
    signal,
  })
  await discard(res.body)
  return nextLocation(res)
}

/** The upload URL a response names (`Location`), resolved against the request URL. */
function nextLocation(res: RegistryResponse, previous?: URL): URL {
  const loc = header(res, 'location')
  if (!loc) {
    if (previous) return previous
    throw new ImageError('BLOB_UPLOAD_INVALID', `upload response from ${res.url.host} has no Location`)
  }
  return new URL(loc, res.url)
}

/** Asks how many bytes an upload session holds (`GET` on its URL, `Range: 0-<last>`). */
async function uploadStatus(client: RegistryClient, repository: string, location: URL, what: string, signal?: AbortSignal) {
  const res = await client.send({
    method: 'GET',
    path: location,
    repository,
    scopes: [repositoryScope(repository, 'pull,push')],
    ok: [204],
    kind: 'upload',
    action: `checking the upload of ${what}`,
    signal,
  })
  await discard(res.body)
  // `0-<last byte>`; distribution says `0-0` for an empty session too, so read that as 0
  const range = /^(?:bytes=)?0-(-?\d+)$/.exec(header(res, 'range') ?? '')
  const last = range ? Number(range[1]) : -1
  return { location: nextLocation(res, location), size: last > 0 ? last + 1 : 0 }
}

async function finishUpload(
  client: RegistryClient,
  repository: string,
  location: URL,
  offset: number,
  digest: Digest,
  last: Chunk | undefined,
  signal?: AbortSignal,
): Promise<void> {
  let body = last?.from(0)
  await withRetry(
    async (attempt) => {
      if (attempt > 1) {
        // The previous PUT may have delivered part of the chunk, or even completed the blob.
        const size = await headBlob(client, repository, digest, signal, true).catch(() => undefined)
        if (size !== undefined) return
        const st = await uploadStatus(client, repository, location, digest, signal)
        const sent = st.size - offset
        if (sent < 0 || sent > (last?.length ?? 0)) {
          throw new ImageError('BLOB_UPLOAD_INVALID', `${client.registry}/${repository}: upload of ${digest} is at byte ${st.size}, expected ${offset}`)
        }
        location = st.location
        body = last && sent < last.length ? last.from(sent) : undefined
      }
      const url = new URL(location)
      url.searchParams.set('digest', digest)
      const res = await client.send({
        method: 'PUT',
        path: url,
        repository,
        scopes: [repositoryScope(repository, 'pull,push')],
        headers: body ? { 'content-type': 'application/octet-stream' } : undefined,
        body,
        ok: [201, 204],
        kind: 'upload',
        action: `completing the upload of ${digest}`,
        signal,
        retry: false,
      })
      await discard(res.body)
      const stored = header(res, 'docker-content-digest')
      if (stored && stored !== digest) {
        throw new RegistryError({ status: res.status, registry: client.registry, repository, action: `completing the upload of ${digest}: the registry stored ${stored}`, kind: 'upload' }, 'DIGEST_INVALID')
      }
    },
    { ...client.retryPolicy, signal, what: `PUT ${digest}` },
  )
}

/** Cancels an upload session; best effort, never throws. */
async function cancelUpload(client: RegistryClient, repository: string, location: URL): Promise<void> {
  try {
    const res = await client.send({
      method: 'DELETE',
      path: location,
      repository,
      scopes: [repositoryScope(repository, 'pull,push')],
      ok: [204, 404],
      kind: 'upload',
      action: 'cancelling an upload',
      signal: AbortSignal.timeout(10_000),
      retry: false,
    })
    await discard(res.body)
  } catch (err) {
    log('cancelling upload %s failed: %s', location.pathname, (err as Error).message)
  }
}

/**
 * Asks the registry to mount `digest` from repository `from` into `repository`. Resolves true
 * when mounted (201); false when the registry opened an ordinary upload instead (202, which is
 * then cancelled) or refused the mount.
 */
export async function mountBlob(client: RegistryClient, repository: string, digest: Digest, from: string, signal?: AbortSignal): Promise<boolean> {
  const path = `/v2/${repository}/blobs/uploads/?mount=${encodeURIComponent(digest)}&from=${encodeURIComponent(from)}`
  try {
    const res = await client.send({
      method: 'POST',
      path,
      repository,
      scopes: [repositoryScope(repository, 'pull,push'), repositoryScope(from, 'pull')],
      ok: [201, 202],
      kind: 'upload',
      action: `mounting ${digest} from ${from}`,
      signal,
    })
    await discard(res.body)
    if (res.status === 201) {
      log('mounted %s from %s into %s', digest, from, repository)
      return true
    }
    await cancelUpload(client, repository, nextLocation(res))
  } catch (err) {
    if (signal?.aborted) throw signal.reason
    log('mount of %s from %s failed: %s', digest, from, (err as Error).message)
  }
  return false
}

/**
 * The size of `digest` in `repository` (HEAD), or undefined when the registry does not hold it.
 * A pusher passes `forPush`: the check then asks for the push token it needs next anyway, so
 * that a token registry hands out one token instead of two (as containers/image does).
 */
export async function headBlob(client: RegistryClient, repository: string, digest: Digest, signal?: AbortSignal, forPush = false): Promise<number | undefined> {
  const res = await client.send({
    method: 'HEAD',
    path: `/v2/${repository}/blobs/${digest}`,
    repository,
    scopes: [repositoryScope(repository, forPush ? 'pull,push' : 'pull')],
    ok: [200, 404],
    kind: 'blob',
    action: `checking for blob ${digest}`,
    signal,
  })
  await discard(res.body)
  if (res.status === 404) return undefined
  const size = Number(header(res, 'content-length'))
  return Number.isSafeInteger(size) ? size : -1
}
