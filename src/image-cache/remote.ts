// The registry side of the image cache: one client per image name, manifest fetches, and blob
// downloads straight into the cache (verified as they stream, then renamed into place).
import debug from 'debug'
import type { Digest } from '../digest.js'
import { ImageError, isImageError } from '../errors.js'
import type { Descriptor } from '../manifest.js'
import type { NamedReference } from '../name.js'
import { type ClientOptions, RegistryClient } from '../registry/client.js'
import { openBlob } from '../registry/download.js'
import { type FetchedManifest, fetchManifest } from '../registry/manifests.js'
import { firstServing, loadRegistriesConf, pullSources, sourceOptions } from '../registry/registries-conf.js'
import { writeBlob } from './blobs.js'
import { sharedPiece } from '../io/hash-thread.js'

const log = debug('blobcache:image-cache:remote')

/** Registry settings of the image cache: TLS, credentials, auth file, retries. */
export type RemoteOptions = ClientOptions

/** One place an image may be read from: its repository and the client that reaches it. */
interface ReadSource {
  named: NamedReference
  mirror: boolean
  client: RegistryClient
}

/**
 * One repository of a registry, reached with one client (connection reuse, one token). A remote
 * opened for reading ({@link Remote.forReading}) may first try the mirrors and remapped location
 * registries.conf gives: the first that serves the first manifest asked is used from then on.
 */
export class Remote {
  #client: RegistryClient
  #at: NamedReference
  /** Places still to choose from, in order, until a manifest is found at one of them. */
  #candidates: ReadSource[] | undefined
  /** Requests made, by kind (for logs and tests). */
  readonly counts = { manifests: 0, blobs: 0 }

  constructor(
    readonly named: NamedReference,
    opts: RemoteOptions = {},
  ) {
    this.#client = new RegistryClient(named.domain, opts)
    this.#at = named
  }

  /**
   * A remote for reading `named`, as registries.conf says (`opts.registriesConf`, else the usual
   * files): mirrors first, then the primary location. Fails `REGISTRY_BLOCKED` for a blocked name.
   */
  static async forReading(named: NamedReference, opts: RemoteOptions = {}): Promise<Remote> {
    const remote = new Remote(named, opts)
    const sources = pullSources(await loadRegistriesConf({ path: opts.registriesConf, env: opts.env }), named)
    if (sources.length > 1 || sources[0].named !== named || sources[0].insecure) {
      remote.#candidates = sources.map((s) => ({
        named: s.named,
        mirror: s.mirror,
        client: new RegistryClient(s.named.domain, sourceOptions(s, opts)),
      }))
    }
    return remote
  }

  /** The client of the place read from (once chosen). */
  get client(): RegistryClient {
    return this.#client
  }

  /** The repository read from (once chosen). */
  get repository(): string {
    return this.#at.path
  }

  /** The name as `registry/repository`. */
  get where(): string {
    return `${this.#at.domain}/${this.#at.path}`
  }

  /** Fetches a manifest by tag or digest (a digest is verified against the bytes). */
  async manifest(reference: string, signal?: AbortSignal): Promise<FetchedManifest> {
    const candidates = this.#candidates
    if (!candidates) {
      this.counts.manifests++
      return fetchManifest(this.#client, this.#at.path, reference, signal)
    }
    const { source, value } = await firstServing(this.named, candidates, (c) => {
      this.counts.manifests++
      return fetchManifest(c.client, c.named.path, reference, signal)
    }, signal)
    this.#candidates = undefined
    this.#client = source.client
    this.#at = source.named
    return value
  }

  /**
   * Fetches a manifest, resolving undefined when the registry says there is none
   * (`MANIFEST_UNKNOWN`, `NAME_UNKNOWN`). Every other failure (network, auth) rejects.
   */
  async manifestIfExists(reference: string, signal?: AbortSignal): Promise<FetchedManifest | undefined> {
    try {
      return await this.manifest(reference, signal)
    } catch (err) {
      if (isImageError(err, 'MANIFEST_UNKNOWN') || isImageError(err, 'NAME_UNKNOWN')) return undefined
      throw err
    }
  }

  /** Downloads a blob into the cache at `dir`, verified against its digest and size. */
  async download(dir: string, d: Pick<Descriptor, 'digest' | 'size'>, signal?: AbortSignal): Promise<number> {
    this.counts.blobs++
    // the registry client checks sizes and resumes broken bodies; writeBlob hashes (once), on
    // the hashing thread for large blobs, straight from the shared memory the pieces arrive in
    const { stream } = await openBlob(this.client, this.repository, d.digest, d.size, { signal, verify: false, allocate: sharedPiece })
    const { size } = await writeBlob(dir, stream, { expected: d.digest, size: d.size, signal })
    log('downloaded %s (%d bytes) from %s', d.digest, size, this.where)
    return size
  }

  /** Reads a small blob (a config) from the registry into memory, verified. */
  async blobBytes(d: Pick<Descriptor, 'digest' | 'size'>, limit: number, signal?: AbortSignal): Promise<Buffer> {
    this.counts.blobs++
    const { stream } = await openBlob(this.client, this.repository, d.digest, d.size, { signal, verify: true })
    const chunks: Buffer[] = []
    let n = 0
    for await (const c of stream) {
      n += (c as Buffer).length
      if (n > limit) {
        stream.destroy()
        throw new ImageError('SIZE_INVALID', `blob ${d.digest} is larger than ${limit} bytes`)
      }
      chunks.push(c as Buffer)
    }
    return Buffer.concat(chunks)
  }
}

/** Runs `fn` over `items` with at most `limit` at once; the first failure rejects (the rest are still awaited). */
export async function eachLimit<T>(items: T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0
  let failure: { err: unknown } | undefined
  const worker = async () => {
    while (next < items.length && !failure) {
      const item = items[next++]
      try {
        await fn(item)
      } catch (err) {
        failure ??= { err }
      }
    }
  }
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker))
  if (failure) throw failure.err
}

/** The digest or tag to fetch for a reference (a digest wins over a tag). */
export function manifestReference(named: NamedReference): string | Digest {
  return named.digest ?? named.tag ?? 'latest'
}
