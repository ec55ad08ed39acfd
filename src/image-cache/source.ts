// newSource: one image of the cache for one platform, pinned to the digests it resolved to when
// it was opened (linuxkit re-resolved the name on every call, so a concurrent pull could swap
// the image under a reader). Gives the config, the three tar exports and the SBOMs.
import type { Readable } from 'node:stream'
import debug from 'debug'
import { ImageError } from '../errors.js'
import type { Descriptor, ImageManifest, Platform } from '../manifest.js'
import { cacheKey } from './names.js'
import { readSmallBlob } from './blobs.js'
import { exportDockerArchive, exportOciArchive } from './export.js'
import { flattenLayers } from './flatten.js'
import type { SelectedImage } from './pull.js'

const log = debug('blobcache:image-cache:source')

/** The media type of in-toto attestation layers. */
export const IN_TOTO_MEDIA_TYPE = 'application/vnd.in-toto+json'
/** The annotation naming an attestation layer's predicate type. */
export const PREDICATE_TYPE = 'in-toto.io/predicate-type'
/** The predicate type of SPDX SBOMs. */
export const SPDX_PREDICATE = 'https://spdx.dev/Document'

/** Options of the tar readers. */
export interface ExportOptions {
  /** The name to record in the archive instead of the image's own. */
  name?: string
  signal?: AbortSignal
}

/** One image of the cache for one platform, opened by {@link ImageCache.newSource}. */
export class CachedImage {
  constructor(
    /** The cache directory. */
    readonly dir: string,
    /** The image's canonical name (or the digest reference it was opened by). */
    readonly name: string,
    /** The root entry in index.json (an index or an image manifest). */
    readonly root: Descriptor,
    /** The platform it was opened for. */
    readonly platform: Platform,
    readonly image: SelectedImage,
  ) {}

  /** The descriptor of the platform's image manifest (its own media type, the platform when the index names one). */
  get descriptor(): Descriptor {
    return this.image.descriptor
  }

  /** The platform's image manifest. */
  get manifest(): ImageManifest {
    return this.image.manifest
  }

  /** The config blob, verified. */
  async config(): Promise<Buffer> {
    return readSmallBlob(this.dir, this.manifest.config.digest)
  }

  /** The config, parsed. */
  async configJSON(): Promise<Record<string, unknown>> {
    return JSON.parse((await this.config()).toString('utf8')) as Record<string, unknown>
  }

  #exported(name: string | undefined) {
    return { descriptor: this.descriptor, manifest: this.manifest, name: name ? cacheKey(name) : this.name.includes('@') ? undefined : this.name }
  }

  /** The image's file system, layers flattened with whiteouts applied, as a tar stream. */
  tarReader(opts: { signal?: AbortSignal } = {}): Readable {
    return flattenLayers(this.dir, this.manifest.layers, opts)
  }

  /** A `docker load` tar of the image, tagged with `opts.name` or the image's own name. */
  v1TarReader(opts: ExportOptions = {}): Readable {
    return exportDockerArchive(this.dir, this.#exported(opts.name), opts)
  }

  /** An OCI image layout tar of the image, which imageLoad re-imports under the same name and digest. */
  ociTarReader(opts: ExportOptions = {}): Readable {
    return exportOciArchive(this.dir, this.#exported(opts.name), opts)
  }

  /**
   * The SPDX SBOMs attached to this platform's image (buildkit attestations): the predicate of
   * each in-toto statement whose predicate type is SPDX, as JSON bytes. Empty when there are none.
   */
  async sboms(): Promise<Buffer[]> {
    const out: Buffer[] = []
    for (const a of this.image.attestations) {
      for (const layer of a.manifest.layers) {
        if (layer.mediaType !== IN_TOTO_MEDIA_TYPE || layer.annotations?.[PREDICATE_TYPE] !== SPDX_PREDICATE) continue
        const bytes = await readSmallBlob(this.dir, layer.digest, 256 << 20)
        let statement: { predicate?: unknown }
        try {
          statement = JSON.parse(bytes.toString('utf8')) as { predicate?: unknown }
        } catch (err) {
          throw new ImageError('MANIFEST_INVALID', `attestation layer ${layer.digest} is not JSON`, { cause: err })
        }
        if (statement.predicate === undefined) throw new ImageError('MANIFEST_INVALID', `attestation layer ${layer.digest} has no predicate`)
        out.push(Buffer.from(JSON.stringify(statement.predicate)))
      }
    }
    log('%s: %d SBOMs', this.name, out.length)
    return out
  }
}
