/** Media types of the OCI image spec and Docker image manifest schema 2. */
export const MediaType = {
  ociManifest: 'application/vnd.oci.image.manifest.v1+json',
  ociIndex: 'application/vnd.oci.image.index.v1+json',
  ociConfig: 'application/vnd.oci.image.config.v1+json',
  ociLayer: 'application/vnd.oci.image.layer.v1.tar',
  ociLayerGzip: 'application/vnd.oci.image.layer.v1.tar+gzip',
  ociLayerZstd: 'application/vnd.oci.image.layer.v1.tar+zstd',
  ociLayerNondistributable: 'application/vnd.oci.image.layer.nondistributable.v1.tar',
  ociLayerNondistributableGzip: 'application/vnd.oci.image.layer.nondistributable.v1.tar+gzip',
  ociLayerNondistributableZstd: 'application/vnd.oci.image.layer.nondistributable.v1.tar+zstd',
  ociEmpty: 'application/vnd.oci.empty.v1+json',
  dockerManifest: 'application/vnd.docker.distribution.manifest.v2+json',
  dockerManifestList: 'application/vnd.docker.distribution.manifest.list.v2+json',
  dockerSchema1: 'application/vnd.docker.distribution.manifest.v1+json',
  dockerSchema1Signed: 'application/vnd.docker.distribution.manifest.v1+prettyjws',
  dockerConfig: 'application/vnd.docker.container.image.v1+json',
  dockerLayer: 'application/vnd.docker.image.rootfs.diff.tar',
  dockerLayerGzip: 'application/vnd.docker.image.rootfs.diff.tar.gzip',
  dockerLayerZstd: 'application/vnd.docker.image.rootfs.diff.tar.zstd',
  dockerForeignLayerGzip: 'application/vnd.docker.image.rootfs.foreign.diff.tar.gzip',
} as const

/** One of the media types in {@link MediaType}. */
export type KnownMediaType = (typeof MediaType)[keyof typeof MediaType]

/** True for an OCI index or a Docker manifest list. */
export function isIndexMediaType(mt: string | undefined): boolean {
  return mt === MediaType.ociIndex || mt === MediaType.dockerManifestList
}

/** True for an OCI image manifest or a Docker schema 2 manifest. */
export function isImageManifestMediaType(mt: string | undefined): boolean {
  return mt === MediaType.ociManifest || mt === MediaType.dockerManifest
}

/** True for any manifest or index media type blobcache can read. */
export function isManifestMediaType(mt: string | undefined): boolean {
  return isIndexMediaType(mt) || isImageManifestMediaType(mt)
}

/**
 * Guesses the media type of manifest bytes, after containers/image's GuessMIMEType: the
 * `mediaType` field when present, else the shape (`manifests` → OCI index, `config` → OCI
 * manifest, `schemaVersion: 1` → Docker schema 1). Returns '' when the bytes are not a manifest.
 */
export function guessMediaType(bytes: Buffer | string): string {
  let doc: unknown
  try {
    doc = JSON.parse(bytes.toString())
  } catch {
    return ''
  }
  if (typeof doc !== 'object' || doc === null || Array.isArray(doc)) return ''
  const m = doc as Record<string, unknown>
  if (typeof m.mediaType === 'string' && m.mediaType !== '') return m.mediaType
  if (m.schemaVersion === 1) return m.signatures ? MediaType.dockerSchema1Signed : MediaType.dockerSchema1
  if (m.schemaVersion !== 2) return ''
  if (Array.isArray(m.manifests)) return MediaType.ociIndex
  if (typeof m.config === 'object' && m.config !== null) {
    const configType = (m.config as Record<string, unknown>).mediaType
    return configType === MediaType.dockerConfig ? MediaType.dockerManifest : MediaType.ociManifest
  }
  return ''
}
