import type { Readable } from 'node:stream'
import type { Digest } from './digest.js'
import type { NamedReference } from './name.js'

/** What {@link ImageDestination.warmUp} may prepare for. */
export interface WarmUpHints {
  /** copyImage will probably call hasManifest for the top level. */
  manifest?: boolean
}

/** What a copy does to layer compression. */
export type LayerCompression = 'preserve' | 'compress' | 'decompress'

/** Compression algorithms blobcache writes. bzip2 and xz are detected and read only. */
export type CompressionAlgorithm = 'gzip' | 'zstd'

/** Every algorithm blobcache can detect. */
export type DetectedAlgorithm = CompressionAlgorithm | 'bzip2' | 'xz'

/** What is known about a blob: its digest, size, media type and, for substitutes, how it differs. */
export interface BlobInfo {
  /** Validated digest; never a path. Missing only for a blob whose digest is not yet known. */
  digest?: Digest
  /** Byte count; -1 when unknown. */
  size: number
  mediaType?: string
  annotations?: Record<string, string>
  urls?: string[]
  /** Set by a source that substitutes a compressed or decompressed variant for a layer. */
  compressionOperation?: LayerCompression
  /** With `compressionOperation: 'compress'`, the algorithm of the substitute. */
  compressionAlgorithm?: CompressionAlgorithm
}

/** Options every async call accepts. */
export interface CallOptions {
  /** Aborts the call; it then rejects with `signal.reason`. */
  signal?: AbortSignal
}

/** Settings for opening sources and destinations. Each field documents its default. */
export interface SystemContext extends CallOptions {
  /** Directory for temporary files (archive transports). Default: `os.tmpdir()`. */
  tmpDir?: string
  /** Registry options, used by the `docker:` transport. */
  registry?: RegistryOptions
}

/** Options of the registry client (docker:// transport). */
export interface RegistryOptions {
  /** Verify TLS certificates; `false` also allows plain HTTP. Default true. */
  tlsVerify?: boolean
  /** Credentials; default: looked up in the auth files. */
  credentials?: { username: string; password: string } | { identityToken: string }
  /** Path of an auth file (`--authfile`); default `REGISTRY_AUTH_FILE` and the usual places. */
  authFile?: string
  /** Anonymous access (skopeo's `--no-creds`): no credentials are given or looked up. Default false. */
  anonymous?: boolean
  /**
   * A bearer token sent as it is when the registry asks for bearer tokens (skopeo's
   * `--registry-token`), instead of one fetched from its token server.
   */
  registryToken?: string
  /**
   * Directory of this registry's TLS files (skopeo's `--cert-dir`): `*.crt` certificate
   * authorities trusted besides the usual ones, `NAME.cert` and `NAME.key` a client certificate.
   * Default: the first of `~/.config/containers/certs.d/HOST[:PORT]`,
   * `/etc/containers/certs.d/HOST[:PORT]` and `/etc/docker/certs.d/HOST[:PORT]` that exists.
   */
  certDir?: string
  /**
   * The registries.conf to read (skopeo's `--registries-conf`), alone. Default:
   * CONTAINERS_REGISTRIES_CONF, else `~/.config/containers/registries.conf` or
   * `/etc/containers/registries.conf` with their `registries.conf.d` drop-ins. It decides where
   * `docker://` images are read from (mirrors, remapped locations) and which may not be read.
   */
  registriesConf?: string
}

/** A named way of storing images, such as `dir` or `oci`. */
export interface ImageTransport {
  /** The scheme before the colon in an image name. */
  readonly name: string
  /** Parses the part after `name:`. MUST throw `REFERENCE_INVALID` for a malformed one. */
  parseReference(s: string): ImageReference
}

/** A reference to one image (or image list) within a transport. */
export interface ImageReference {
  readonly transport: ImageTransport
  /** The part after `transport:`; MUST round-trip through `transport.parseReference`. */
  stringWithinTransport(): string
  /** The docker reference this image is known by, if any (registry, archive tag, oci name). */
  dockerReference(): NamedReference | undefined
  /** Opens the image for reading. */
  newImageSource(ctx?: SystemContext): Promise<ImageSource>
  /** Opens the image for writing; nothing is visible until `commit()`. */
  newImageDestination(ctx?: SystemContext): Promise<ImageDestination>
  /** Removes the image (its name; blobs where the transport owns them). */
  deleteImage(ctx?: SystemContext): Promise<void>
}

/** Byte ranges for {@link ImageSource.getBlobAt}; `length` -1 means to the end. */
export interface BlobChunk {
  offset: number
  length: number
}

/** An image, or image list, opened for reading. */
export interface ImageSource {
  readonly reference: ImageReference
  /**
   * Returns the top-level manifest, or with `instanceDigest` the manifest of that instance of
   * a list. MUST fail `MANIFEST_UNKNOWN` when there is none.
   */
  getManifest(instanceDigest?: Digest, opts?: CallOptions): Promise<{ bytes: Buffer; mediaType: string }>
  /**
   * Opens a blob. MUST fail `BLOB_UNKNOWN` when it is not there. The stream is not verified by
   * the source; the caller verifies it.
   */
  getBlob(info: BlobInfo, opts?: CallOptions): Promise<{ stream: Readable; size: number }>
  /** Returns signatures of the image (or instance); empty when there are none. */
  getSignatures(instanceDigest?: Digest, opts?: CallOptions): Promise<Buffer[]>
  /**
   * Optional: the layers to copy, when they differ from the manifest's (substituted variants).
   * `undefined` means "use the manifest's".
   */
  layerInfosForCopy?(instanceDigest?: Digest, opts?: CallOptions): Promise<BlobInfo[] | undefined>
  /** Optional: reads byte ranges of a blob, one stream per chunk, in order. */
  getBlobAt?(info: BlobInfo, chunks: BlobChunk[], opts?: CallOptions): AsyncIterable<Readable>
  /** Optional: the local path of a blob whose bytes are known to match its digest. */
  getVerifiedBlobPath?(info: BlobInfo, opts?: CallOptions): Promise<string | undefined>
  /**
   * Optional: the path of the local regular file that holds the blob as the source stores it
   * (a layout's blob), or undefined. Its bytes are NOT verified: whoever reads it verifies
   * them before anything is named by them, as with {@link getBlob}'s stream.
   */
  getLocalBlobPath?(info: BlobInfo, opts?: CallOptions): Promise<string | undefined>
  /** Releases what the source holds (temp dirs, connections). */
  close(): Promise<void>
}

/** Options of {@link ImageDestination.putBlob}. */
export interface PutBlobOptions extends CallOptions {
  /** The blob is the image config. */
  isConfig?: boolean
  /** Told the bytes read so far, now and then, by putBlobFromLocalFile (which reads by itself). */
  onProgress?: (bytes: number) => void
}

/** An image being written. Nothing is visible under its name before `commit()`. */
export interface ImageDestination {
  readonly reference: ImageReference
  /** Manifest types it stores, preferred first; `undefined` means any. */
  supportedManifestMIMETypes(): string[] | undefined
  /** What it wants done to layers that are copied into it. */
  desiredLayerCompression(): LayerCompression
  /** Whether it can store an image list (index) and its instances. */
  acceptsImageLists(): boolean
  /**
   * Stores a blob. MUST verify the digest if given, and on any stream error or mismatch fail
   * and keep nothing. Resolves the stored blob's digest and size.
   */
  putBlob(stream: Readable, info: BlobInfo, opts?: PutBlobOptions): Promise<BlobInfo>
  /**
   * Optional: stores a blob from a local file whose bytes are known to match `info.digest`,
   * for example by `fs.copyFile`. Same contract as putBlob otherwise.
   */
  putBlobFromFile?(path: string, info: BlobInfo, opts?: PutBlobOptions): Promise<BlobInfo>
  /**
   * Optional: stores a blob from a local file that is NOT known to match `info.digest` (see
   * {@link ImageSource.getLocalBlobPath}). It MUST verify the bytes as putBlob verifies its
   * stream (`DIGEST_INVALID`, `SIZE_INVALID`, keeping nothing) and only read the file.
   */
  putBlobFromLocalFile?(path: string, info: BlobInfo, opts?: PutBlobOptions): Promise<BlobInfo>
  /**
   * Optional, with putBlobFromFile: the directory it hard-links files into, unread, when they
   * are on its file system. A file given from anywhere else is read again (copied), so a writer
   * preparing one for it keeps it in the page cache unless it is on this directory's device.
   */
  readonly linkDirectory?: string
  /** Resolves the stored blob's info if the destination already holds it, else undefined. */
  tryReusingBlob(info: BlobInfo, opts?: PutBlobOptions): Promise<BlobInfo | undefined>
  /**
   * Optional: whether the destination already holds the manifest `digest` under the name
   * putManifest would give it (the reference's tag or digest; with `instanceDigest`, that
   * instance), and so every blob it names. copyImage then writes nothing of that image, as
   * crane does, and for the top level does not commit either. Resolving false is always safe;
   * it MUST NOT resolve true on a guess.
   */
  hasManifest?(digest: Digest, instanceDigest?: Digest, opts?: CallOptions): Promise<boolean>
  /** Stores a manifest: the top-level one, or with `instanceDigest` that instance of a list. */
  putManifest(bytes: Buffer, instanceDigest?: Digest, opts?: CallOptions): Promise<void>
  /**
   * Optional: stores signatures. A destination without it cannot store signatures, and
   * copyImage refuses to drop them unless told to.
   */
  putSignatures?(signatures: Buffer[], instanceDigest?: Digest, opts?: CallOptions): Promise<void>
  /**
   * Optional: a hint that writing starts soon, given by copyImage before it reads the source;
   * a destination may start slow set-up here (a registry's `/v2/` ping), and with
   * `hints.manifest` the question hasManifest will be asked for the top level (which manifest
   * its name holds). MUST NOT throw: a failure shows when the destination is used. close()
   * stops what it started.
   */
  warmUp?(hints?: WarmUpHints): void
  /** Makes the image visible under its name. */
  commit(opts?: CallOptions): Promise<void>
  /** Releases resources; without a commit, MUST remove what was staged. */
  close(): Promise<void>
}
