import debug from 'debug'
import { type Digest, digestAlgorithm, digestOf, isDigest } from '../digest.js'
import { ImageError } from '../errors.js'
import { MAX_MANIFEST_SIZE } from '../manifest.js'
import { MediaType, guessMediaType } from '../media-types.js'
import { repositoryScope } from './auth.js'
import { type RegistryClient, discard, header, readBuffer } from './client.js'
import { RegistryError } from './errors.js'
import { withRetry } from './retry.js'

const log = debug('blobcache:registry:manifests')

/** The manifest types asked for, in order of preference: OCI and Docker, images and lists. */
export const MANIFEST_ACCEPT = [
  MediaType.ociManifest,
  MediaType.ociIndex,
  MediaType.dockerManifest,
  MediaType.dockerManifestList,
].join(', ')

/** A manifest as fetched: its bytes, its media type, and its digest (computed, not trusted). */
export interface FetchedManifest {
  bytes: Buffer
  mediaType: string
  digest: Digest
}

/**
 * Fetches the manifest `reference` (a tag or a digest) of `repository`. A digest reference is
 * verified against the bytes (`DIGEST_INVALID` on mismatch); a missing manifest, or repository,
 * rejects with `MANIFEST_UNKNOWN`. Manifests over 4 MiB are refused.
 */
export async function fetchManifest(client: RegistryClient, repository: string, reference: string, signal?: AbortSignal): Promise<FetchedManifest> {
  // A connection cut in the middle of the body is as transient as one cut before the answer:
  // the body is read inside its own retry (send retries only up to the headers), and a body
  // that still cannot be read fails with a typed RegistryError instead of a bare socket error.
  const cut = new WeakSet<object>()
  const { res, bytes } = await withRetry(async () => {
    const res = await client
      .send({
        method: 'GET',
        path: `/v2/${repository}/manifests/${reference}`,
        repository,
        scopes: [repositoryScope(repository, 'pull')],
        headers: { accept: MANIFEST_ACCEPT },
        kind: 'manifest',
        action: `fetching manifest ${reference}`,
        signal,
      })
      .catch(manifestUnknown)
    try {
      return { res, bytes: await readBuffer(res.body, MAX_MANIFEST_SIZE, () => new ImageError('MANIFEST_INVALID', `manifest ${reference} of ${client.registry}/${repository} is larger than ${MAX_MANIFEST_SIZE} bytes`)) }
    } catch (err) {
      if (err instanceof ImageError || signal?.aborted) throw err
      const typed = new RegistryError({ status: 0, registry: client.registry, repository, action: `reading manifest ${reference}`, kind: 'manifest', cause: err })
      cut.add(typed)
      throw typed
    }
  }, { ...client.retryPolicy, signal, what: `manifest ${reference}`, retryable: (err) => cut.has(err as object) })
  const expected = isDigest(reference) ? reference : undefined
  const digest = digestOf(bytes, expected ? digestAlgorithm(expected) : 'sha256')
  if (expected && digest !== expected) {
    throw new RegistryError({ status: res.status, registry: client.registry, repository, action: `fetching manifest ${reference}: the registry sent bytes with digest ${digest}`, kind: 'manifest' }, 'DIGEST_INVALID')
  }
  const contentType = (header(res, 'content-type') ?? '').split(';')[0].trim()
  const mediaType = contentType && contentType !== 'application/json' && contentType !== 'text/plain' ? contentType : guessMediaType(bytes)
  log('manifest %s of %s/%s: %s, %d bytes', reference, client.registry, repository, mediaType, bytes.length)
  return { bytes, mediaType, digest }
}

/**
 * Asks (HEAD) which manifest `reference` (a tag or a digest) of `repository` names, with the
 * scope a push holds. Resolves its digest as the registry reports it (`Docker-Content-Digest`,
 * not checked against any bytes) and its size, or undefined when there is none. A 403 counts as
 * none too: some registries answer it for a missing manifest. An answer without the digest
 * header resolves `digest: undefined`.
 */
export async function headManifest(
  client: RegistryClient,
  repository: string,
  reference: string,
  signal?: AbortSignal,
): Promise<{ digest: Digest | undefined; size: number } | undefined> {
  let res
  try {
    res = await client.send({
      method: 'HEAD',
      path: `/v2/${repository}/manifests/${reference}`,
      repository,
      scopes: [repositoryScope(repository, 'pull,push')],
      headers: { accept: MANIFEST_ACCEPT },
      ok: [200, 404],
      kind: 'manifest',
      action: `checking for manifest ${reference}`,
      signal,
    })
  } catch (err) {
    if (err instanceof RegistryError && err.status === 403) return undefined
    throw err
  }
  await discard(res.body)
  if (res.status === 404) return undefined
  const reported = header(res, 'docker-content-digest')?.trim()
  const size = Number(header(res, 'content-length'))
  return { digest: reported && isDigest(reported) ? reported : undefined, size: Number.isSafeInteger(size) ? size : -1 }
}

/** Turns a 404 of any registry code (NAME_UNKNOWN too) into `MANIFEST_UNKNOWN`. */
function manifestUnknown(err: unknown): never {
  if (err instanceof RegistryError && err.status === 404 && err.code !== 'MANIFEST_UNKNOWN') {
    const { status, registry, repository, action, errors } = err
    throw new RegistryError({ status, registry, repository, action, errors, kind: 'manifest', cause: err }, 'MANIFEST_UNKNOWN')
  }
  throw err
}

/**
 * Stores manifest bytes under `reference` (a tag or a digest) with their media type
 * (guessed from the bytes when not given). A digest reference MUST match the bytes.
 */
export async function pushManifest(
  client: RegistryClient,
  repository: string,
  reference: string,
  bytes: Buffer,
  mediaType?: string,
  signal?: AbortSignal,
): Promise<Digest> {
  const digest = digestOf(bytes, isDigest(reference) ? digestAlgorithm(reference) : 'sha256')
  if (isDigest(reference) && digest !== reference) {
    throw new ImageError('DIGEST_INVALID', `manifest bytes hash to ${digest}, not ${reference}`)
  }
  const type = mediaType || guessMediaType(bytes)
  if (!type) throw new ImageError('MANIFEST_INVALID', `cannot tell the media type of the manifest for ${reference}`)
  const res = await client.send({
    method: 'PUT',
    path: `/v2/${repository}/manifests/${reference}`,
    repository,
    scopes: [repositoryScope(repository, 'pull,push')],
    headers: { 'content-type': type },
    body: bytes,
    ok: [200, 201, 202, 204],
    kind: 'manifest',
    action: `storing manifest ${reference}`,
    signal,
  })
  await discard(res.body)
  log('stored manifest %s (%s) in %s/%s', reference, digest, client.registry, repository)
  return digest
}

/** Deletes the manifest `digest` of `repository` (and so every tag pointing at it). */
export async function deleteManifest(client: RegistryClient, repository: string, digest: Digest, signal?: AbortSignal): Promise<void> {
  const res = await client
    .send({
      method: 'DELETE',
      path: `/v2/${repository}/manifests/${digest}`,
      repository,
      scopes: [repositoryScope(repository, 'pull,delete')],
      ok: [200, 202, 204],
      kind: 'manifest',
      action: `deleting manifest ${digest}`,
      signal,
    })
    .catch(manifestUnknown)
  await discard(res.body)
  log('deleted manifest %s from %s/%s', digest, client.registry, repository)
}

/** Options of {@link fetchTags}. */
export interface TagListOptions {
  signal?: AbortSignal
  /** Tags asked for per page (`?n=`); default: the registry's choice. */
  pageSize?: number
}

/**
 * Lists every tag of `repository`, following `Link: <…>; rel="next"` pages. A repository the
 * registry does not know rejects with `NAME_UNKNOWN`.
 */
export async function fetchTags(client: RegistryClient, repository: string, opts: TagListOptions = {}): Promise<string[]> {
  const tags: string[] = []
  let next: string | URL | undefined = `/v2/${repository}/tags/list${opts.pageSize ? `?n=${opts.pageSize}` : ''}`
  const seen = new Set<string>()
  while (next) {
    const res = await client.send({
      method: 'GET',
      path: next,
      repository,
      scopes: [repositoryScope(repository, 'pull')],
      kind: 'tags',
      action: 'listing tags',
      signal: opts.signal,
    })
    seen.add(res.url.href)
    const body = await readBuffer(res.body, 16 << 20, () => new ImageError('REGISTRY_ERROR', `tag list of ${client.registry}/${repository} is too large`))
    let doc: { tags?: unknown }
    try {
      doc = JSON.parse(body.toString('utf8')) as typeof doc
    } catch (cause) {
      throw new ImageError('REGISTRY_ERROR', `tag list of ${client.registry}/${repository} is not JSON`, { cause })
    }
    if (Array.isArray(doc.tags)) for (const t of doc.tags) if (typeof t === 'string') tags.push(t)
    const link = /<([^>]*)>\s*;\s*rel="?next"?/i.exec(header(res, 'link') ?? '')
    next = link ? new URL(link[1], res.url) : undefined
    if (next && seen.has(next.href)) next = undefined
  }
  return tags
}
