// An in-memory transport for copy tests: images live in a MemoryStore (shared blobs, per-name
// manifests and signatures). Its capabilities are set per transport (accepted manifest types,
// desired compression, list support, signatures, substitutes, slow streams), so one test can
// stand in for a registry that only speaks Docker schema 2 or for a blob cache that offers
// variants. Destinations verify what they receive and keep nothing before commit().
import { setTimeout as sleep } from 'node:timers/promises'
import { Readable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { type Digest, digestOf, parseDigest, verifyDigest } from '../../src/digest.js'
import { DigestMismatchError, ImageError } from '../../src/errors.js'
import { guessMediaType } from '../../src/media-types.js'
import type {
  BlobInfo, CallOptions, ImageDestination, ImageReference, ImageSource, ImageTransport, LayerCompression, PutBlobOptions,
} from '../../src/types.js'

/** One stored image (or list): its top manifest, instances and signatures. */
export interface MemoryImage {
  manifest: { bytes: Buffer; mediaType: string }
  instances: Map<Digest, Buffer>
  /** Signatures by instance digest; '' for the top level. */
  signatures: Map<string, Buffer[]>
}

/** Blobs shared by every image of the store, and images by name. */
export class MemoryStore {
  readonly blobs = new Map<Digest, Buffer>()
  readonly images = new Map<string, MemoryImage>()
  /** Every putBlob call that reached a destination of this store (digest or 'unknown'). */
  readonly puts: string[] = []
  /** Every hasManifest question asked of a destination of this store: `name digest [instance]`. */
  readonly manifestChecks: string[] = []
}

/** Capabilities of a memory transport. Defaults: any manifest type, preserve, lists, signatures. */
export interface MemoryTransportOptions {
  supportedManifestMIMETypes?: string[]
  desiredLayerCompression?: LayerCompression
  acceptsImageLists?: boolean
  /** Whether destinations have putSignatures. Default true. */
  signatures?: boolean
  /** Whether destinations have hasManifest (answered from the store). Default false. */
  hasManifest?: boolean
  /** Whether tryReusingBlob finds blobs already in the store. Default true. */
  reuse?: boolean
  /** Source: substitutes returned by layerInfosForCopy (per instance digest, '' for the top). */
  layerInfosForCopy?: (instance: Digest | undefined) => BlobInfo[] | undefined
  /** Source: split blob streams into chunks of this size, waiting `delayMs` between them. */
  chunkSize?: number
  delayMs?: number
}

/** A memory transport over `store`; `parseReference(name)` names an image in it. */
export function memoryTransport(store: MemoryStore, opts: MemoryTransportOptions = {}): ImageTransport & { store: MemoryStore } {
  const transport = {
    name: 'memory',
    store,
    parseReference: (s: string): ImageReference => new MemoryReference(transport, store, opts, s),
  }
  return transport
}

class MemoryReference implements ImageReference {
  constructor(
    readonly transport: ImageTransport,
    readonly store: MemoryStore,
    readonly opts: MemoryTransportOptions,
    readonly name: string,
  ) {}

  stringWithinTransport(): string {
    return this.name
  }

  dockerReference(): undefined {
    return undefined
  }

  async newImageSource(): Promise<ImageSource> {
    const image = this.store.images.get(this.name)
    if (!image) throw new ImageError('MANIFEST_UNKNOWN', `memory:${this.name}: no such image`)
    return new MemorySource(this, image)
  }

  async newImageDestination(): Promise<ImageDestination> {
    return new MemoryDestination(this)
  }

  async deleteImage(): Promise<void> {
    this.store.images.delete(this.name)
  }
}

class MemorySource implements ImageSource {
  layerInfosForCopy?: (instance?: Digest) => Promise<BlobInfo[] | undefined>

  constructor(
    readonly reference: MemoryReference,
    readonly image: MemoryImage,
  ) {
    const substitutes = reference.opts.layerInfosForCopy
    if (substitutes) this.layerInfosForCopy = async (instance) => substitutes(instance)
  }

  async getManifest(instanceDigest?: Digest): Promise<{ bytes: Buffer; mediaType: string }> {
    if (!instanceDigest) return this.image.manifest
    const bytes = this.image.instances.get(instanceDigest)
    if (!bytes) throw new ImageError('MANIFEST_UNKNOWN', `memory:${this.reference.name}: no instance ${instanceDigest}`)
    return { bytes, mediaType: guessMediaType(bytes) }
  }

  async getBlob(info: BlobInfo, opts?: CallOptions): Promise<{ stream: Readable; size: number }> {
    opts?.signal?.throwIfAborted()
    const data = info.digest && this.reference.store.blobs.get(info.digest)
    if (!data) throw new ImageError('BLOB_UNKNOWN', `memory: blob ${info.digest}: not found`)
    const { chunkSize, delayMs } = this.reference.opts
    if (!chunkSize) return { stream: Readable.from([data]), size: data.length }
    async function* slow() {
      for (let i = 0; i < data!.length; i += chunkSize!) {
        if (delayMs) await sleep(delayMs)
        yield data!.subarray(i, i + chunkSize!)
      }
    }
    return { stream: Readable.from(slow()), size: data.length }
  }

  async getSignatures(instanceDigest?: Digest): Promise<Buffer[]> {
    return this.image.signatures.get(instanceDigest ?? '') ?? []
  }

  async close(): Promise<void> {}
}

class MemoryDestination implements ImageDestination {
  readonly #blobs = new Map<Digest, Buffer>()
  readonly #instances = new Map<Digest, Buffer>()
  readonly #signatures = new Map<string, Buffer[]>()
  #manifest: Buffer | undefined
  #committed = false
  putSignatures?: (signatures: Buffer[], instanceDigest?: Digest) => Promise<void>
  hasManifest?: (digest: Digest, instanceDigest?: Digest) => Promise<boolean>

  constructor(readonly reference: MemoryReference) {
    if (reference.opts.hasManifest) {
      this.hasManifest = async (digest, instanceDigest) => {
        const { store, name } = reference
        store.manifestChecks.push([name, digest, instanceDigest].filter(Boolean).join(' '))
        const image = store.images.get(name)
        if (!image) return false
        if (instanceDigest) return instanceDigest === digest && image.instances.has(digest)
        return digestOf(image.manifest.bytes) === digest
      }
    }
    if (reference.opts.signatures !== false) {
      this.putSignatures = async (signatures, instanceDigest) => {
        this.#signatures.set(instanceDigest ?? '', signatures)
      }
    }
  }

  supportedManifestMIMETypes(): string[] | undefined {
    return this.reference.opts.supportedManifestMIMETypes
  }

  desiredLayerCompression(): LayerCompression {
    return this.reference.opts.desiredLayerCompression ?? 'preserve'
  }

  acceptsImageLists(): boolean {
    return this.reference.opts.acceptsImageLists ?? true
  }

  async putBlob(stream: Readable, info: BlobInfo, opts?: PutBlobOptions): Promise<BlobInfo> {
    this.reference.store.puts.push(info.digest ?? 'unknown')
    const check = verifyDigest({ expected: info.digest ? parseDigest(info.digest) : undefined, size: info.size })
    const chunks: Buffer[] = []
    await pipeline(stream, check, async (source: AsyncIterable<Buffer>) => {
      for await (const chunk of source) chunks.push(chunk)
    }, { signal: opts?.signal })
    const data = Buffer.concat(chunks)
    this.#blobs.set(check.digest, data)
    return { ...info, digest: check.digest, size: data.length }
  }

  async tryReusingBlob(info: BlobInfo): Promise<BlobInfo | undefined> {
    if (this.reference.opts.reuse === false || !info.digest) return undefined
    const data = this.reference.store.blobs.get(info.digest) ?? this.#blobs.get(info.digest)
    return data ? { ...info, size: data.length } : undefined
  }

  async putManifest(bytes: Buffer, instanceDigest?: Digest): Promise<void> {
    const supported = this.supportedManifestMIMETypes()
    const mediaType = guessMediaType(bytes)
    if (supported && !supported.includes(mediaType)) throw new ImageError('UNSUPPORTED', `memory: ${mediaType} not accepted`)
    if (!instanceDigest) {
      this.#manifest = Buffer.from(bytes)
      return
    }
    if (digestOf(bytes) !== instanceDigest) throw new DigestMismatchError(instanceDigest, digestOf(bytes))
    this.#instances.set(instanceDigest, Buffer.from(bytes))
  }

  async commit(): Promise<void> {
    if (!this.#manifest) throw new ImageError('MANIFEST_UNKNOWN', 'memory: commit without a manifest')
    for (const [d, b] of this.#blobs) this.reference.store.blobs.set(d, b)
    this.reference.store.images.set(this.reference.name, {
      manifest: { bytes: this.#manifest, mediaType: guessMediaType(this.#manifest) },
      instances: new Map(this.#instances),
      signatures: new Map(this.#signatures),
    })
    this.#committed = true
  }

  async close(): Promise<void> {
    if (!this.#committed) this.#blobs.clear()
  }
}
