import { type Digest, digestOf, parseDigest } from './digest.js'
import { ImageError } from './errors.js'
import { MediaType, guessMediaType, isImageManifestMediaType, isIndexMediaType } from './media-types.js'
import type { CompressionAlgorithm } from './types.js'

/** Largest manifest accepted, as in containers/image (4 MiB). */
export const MAX_MANIFEST_SIZE = 4 << 20

/** An OCI platform: os, architecture and optional variant. */
export interface Platform {
  architecture: string
  os: string
  'os.version'?: string
  'os.features'?: string[]
  variant?: string
  features?: string[]
}

/** An OCI content descriptor (also used for Docker schema 2). */
export interface Descriptor {
  mediaType: string
  digest: Digest
  size: number
  urls?: string[]
  annotations?: Record<string, string>
  platform?: Platform
  artifactType?: string
  data?: string
}

/** An OCI image manifest or Docker schema 2 manifest. */
export interface ImageManifest {
  schemaVersion: 2
  mediaType?: string
  artifactType?: string
  config: Descriptor
  layers: Descriptor[]
  subject?: Descriptor
  annotations?: Record<string, string>
}

/** An OCI image index or Docker manifest list. */
export interface ImageIndex {
  schemaVersion: 2
  mediaType?: string
  artifactType?: string
  manifests: Descriptor[]
  subject?: Descriptor
  annotations?: Record<string, string>
}

/** A validated manifest: an image or an index, with its effective media type. */
export type ParsedManifest =
  | { kind: 'image'; mediaType: string; manifest: ImageManifest }
  | { kind: 'index'; mediaType: string; index: ImageIndex }

const invalid = (msg: string) => new ImageError('MANIFEST_INVALID', `invalid manifest: ${msg}`)

function checkSize(n: unknown, where: string): number {
  if (typeof n !== 'number' || !Number.isSafeInteger(n) || n < 0) throw invalid(`${where}: size ${JSON.stringify(n)} is not a byte count`)
  return n
}

function checkStringMap(m: unknown, where: string): void {
  if (m === undefined) return
  if (typeof m !== 'object' || m === null || Array.isArray(m)) throw invalid(`${where}: annotations must be an object`)
  for (const v of Object.values(m)) if (typeof v !== 'string') throw invalid(`${where}: annotation values must be strings`)
}

/** Validates one descriptor in place and returns it typed. Throws `MANIFEST_INVALID`. */
export function checkDescriptor(d: unknown, where: string): Descriptor {
  if (typeof d !== 'object' || d === null || Array.isArray(d)) throw invalid(`${where} is not an object`)
  const desc = d as Record<string, unknown>
  if (typeof desc.mediaType !== 'string' || desc.mediaType === '') throw invalid(`${where}: missing mediaType`)
  try {
    parseDigest(desc.digest)
  } catch (err) {
    throw new ImageError('MANIFEST_INVALID', `invalid manifest: ${where}: ${(err as Error).message}`, { cause: err })
  }
  checkSize(desc.size, where)
  checkStringMap(desc.annotations, where)
  if (desc.urls !== undefined && (!Array.isArray(desc.urls) || desc.urls.some((u) => typeof u !== 'string'))) {
    throw invalid(`${where}: urls must be strings`)
  }
  if (desc.platform !== undefined) {
    const p = desc.platform as Record<string, unknown> | null
    if (typeof p !== 'object' || p === null || typeof p.os !== 'string' || typeof p.architecture !== 'string') {
      throw invalid(`${where}: platform needs os and architecture`)
    }
  }
  return desc as unknown as Descriptor
}

/**
 * Parses and validates manifest bytes. `mediaType` is what the transport says the bytes are;
 * without it the type is guessed. Throws `MANIFEST_INVALID` for malformed input (bad JSON,
 * wrong schemaVersion, bad digests or sizes, a type that contradicts the body) and
 * `UNSUPPORTED` for Docker schema 1.
 */
export function parseManifest(bytes: Buffer, mediaType?: string): ParsedManifest {
  if (bytes.length > MAX_MANIFEST_SIZE) throw invalid(`${bytes.length} bytes is larger than ${MAX_MANIFEST_SIZE}`)
  let doc: unknown
  try {
    doc = JSON.parse(bytes.toString('utf8'))
  } catch (err) {
    throw new ImageError('MANIFEST_INVALID', `invalid manifest: not JSON (${(err as Error).message})`, { cause: err })
  }
  if (typeof doc !== 'object' || doc === null || Array.isArray(doc)) throw invalid('not a JSON object')
  const m = doc as Record<string, unknown>
  if (m.schemaVersion === 1) throw new ImageError('UNSUPPORTED', 'Docker schema 1 manifests are not supported')
  if (m.schemaVersion !== 2) throw invalid(`schemaVersion ${JSON.stringify(m.schemaVersion)}, expected 2`)
  const guessed = guessMediaType(bytes)
  const type = mediaType && mediaType !== 'application/json' && mediaType !== 'text/plain' ? mediaType : guessed
  if (typeof m.mediaType === 'string' && m.mediaType !== '' && m.mediaType !== type) {
    throw invalid(`mediaType ${m.mediaType} in the body contradicts ${type}`)
  }
  if (m.mediaType !== undefined && typeof m.mediaType !== 'string') throw invalid('mediaType is not a string')
  checkStringMap(m.annotations, 'manifest')
  if (m.subject !== undefined) checkDescriptor(m.subject, 'subject')
  if (isIndexMediaType(type)) {
    if (!Array.isArray(m.manifests)) throw invalid('an index needs a manifests array')
    if (m.config !== undefined || m.layers !== undefined) throw invalid('an index has no config or layers')
    m.manifests.forEach((d, i) => checkDescriptor(d, `manifests[${i}]`))
    return { kind: 'index', mediaType: type, index: m as unknown as ImageIndex }
  }
  if (isImageManifestMediaType(type)) {
    if (m.manifests !== undefined) throw invalid('an image manifest has no manifests array')
    checkDescriptor(m.config, 'config')
    if (!Array.isArray(m.layers)) throw invalid('layers must be an array')
    m.layers.forEach((d, i) => checkDescriptor(d, `layers[${i}]`))
    return { kind: 'image', mediaType: type, manifest: m as unknown as ImageManifest }
  }
  throw new ImageError('UNSUPPORTED', `unsupported manifest type ${JSON.stringify(type || 'unknown')}`)
}

/** The digest of manifest bytes (sha256). */
export function manifestDigest(bytes: Buffer): Digest {
  return digestOf(bytes)
}

/** Serialises a manifest or index the way containers/image does after an edit (compact JSON). */
export function serializeManifest(m: ImageManifest | ImageIndex): Buffer {
  return Buffer.from(JSON.stringify(m))
}

// ---------------------------------------------------------------------------------------------
// Platforms

const ARCH_ALIASES: Record<string, string> = {
  x86_64: 'amd64', 'x86-64': 'amd64', aarch64: 'arm64', armhf: 'arm', armel: 'arm', i386: '386', i686: '386',
}

/** Normalises a platform as containerd does: `aarch64` → `arm64`, `arm64/v8` → `arm64`, `arm` → `arm/v7`. */
export function normalizePlatform(p: Platform): Platform {
  const os = p.os.toLowerCase()
  const raw = p.architecture.toLowerCase()
  let architecture = ARCH_ALIASES[raw] ?? raw
  let variant = p.variant?.toLowerCase() ?? ''
  if (raw === 'armel' && !variant) variant = 'v6'
  if (architecture === 'arm64' && (variant === 'v8' || variant === '8')) variant = ''
  if (architecture === 'amd64' && (variant === 'v1' || variant === '1')) variant = ''
  if (architecture === 'arm') {
    if (!variant || variant === '7') variant = 'v7'
    else if (/^\d$/.test(variant)) variant = `v${variant}`
  }
  const out: Platform = { os, architecture }
  if (variant) out.variant = variant
  if (p['os.version']) out['os.version'] = p['os.version']
  return out
}

/** Parses `os/arch[/variant]`. Throws `PLATFORM_UNKNOWN` for anything else. */
export function parsePlatform(s: string): Platform {
  const parts = s.split('/')
  if (parts.length < 2 || parts.length > 3 || parts.some((x) => !/^[A-Za-z0-9_.-]+$/.test(x))) {
    throw new ImageError('PLATFORM_UNKNOWN', `invalid platform ${JSON.stringify(s)}: expected os/arch[/variant]`)
  }
  const [os, architecture, variant] = parts
  return variant ? { os, architecture, variant } : { os, architecture }
}

/** Formats a platform as `os/arch[/variant]`. */
export function formatPlatform(p: Platform): string {
  return [p.os, p.architecture, p.variant].filter(Boolean).join('/')
}

/** The platform of the running process. */
export function currentPlatform(): Platform {
  const archMap: Record<string, string> = { x64: 'amd64', ia32: '386', ppc64: 'ppc64le', arm: 'arm' }
  const architecture = archMap[process.arch] ?? process.arch
  const p: Platform = { os: process.platform === 'win32' ? 'windows' : process.platform, architecture }
  if (architecture === 'arm') {
    const v = (process.config.variables as unknown as Record<string, unknown>).arm_version
    p.variant = `v${v ?? 7}`
  }
  return normalizePlatform(p)
}

/** Variants that run on a wanted variant, best first (containerd's arm compatibility). */
function compatibleVariants(architecture: string, variant: string | undefined): string[] {
  if (architecture === 'arm') {
    const n = Number((variant ?? 'v7').slice(1))
    const out: string[] = []
    for (let v = n; v >= 5; v--) out.push(`v${v}`)
    return out
  }
  return [variant ?? '']
}

/** True for index entries that are not runnable images (attestations, `unknown/unknown`). */
export function isAttestationDescriptor(d: Descriptor): boolean {
  return (
    d.annotations?.['vnd.docker.reference.type'] === 'attestation-manifest' ||
    (d.platform?.os === 'unknown' && d.platform?.architecture === 'unknown')
  )
}

/**
 * Chooses the instance of an index for a platform (default: the running one), preferring an
 * exact variant, then compatible older arm variants. `arm64` and `arm64/v8` are the same.
 * Throws `PLATFORM_UNKNOWN` naming the platforms the index offers.
 */
export function choosePlatform(index: ImageIndex, want: Platform = currentPlatform()): Descriptor {
  const w = normalizePlatform(want)
  const candidates = index.manifests.filter(
    (d) => d.platform && isImageManifestMediaType(d.mediaType) && !isAttestationDescriptor(d),
  )
  for (const variant of compatibleVariants(w.architecture, w.variant)) {
    const found = candidates.find((d) => {
      const p = normalizePlatform(d.platform!)
      return p.os === w.os && p.architecture === w.architecture && (p.variant ?? '') === variant &&
        (!w['os.version'] || p['os.version'] === w['os.version'])
    })
    if (found) return found
  }
  const offered = candidates.map((d) => formatPlatform(d.platform!)).join(', ') || 'none'
  throw new ImageError('PLATFORM_UNKNOWN', `no image for platform ${formatPlatform(w)} in the list (offered: ${offered})`)
}

// ---------------------------------------------------------------------------------------------
// Layer media types and format conversion

/** The manifest formats a copy can produce. */
export type ManifestFormat = 'oci' | 'v2s2'

/** The compression a layer media type declares: an algorithm, null for uncompressed, undefined if unknown. */
export function layerCompressionOf(mediaType: string): CompressionAlgorithm | null | undefined {
  switch (mediaType) {
    case MediaType.ociLayer:
    case MediaType.ociLayerNondistributable:
    case MediaType.dockerLayer:
    case 'application/vnd.docker.image.rootfs.foreign.diff.tar':
      return null
    case MediaType.ociLayerGzip:
    case MediaType.ociLayerNondistributableGzip:
    case MediaType.dockerLayerGzip:
    case MediaType.dockerForeignLayerGzip:
      return 'gzip'
    case MediaType.ociLayerZstd:
    case MediaType.ociLayerNondistributableZstd:
    case MediaType.dockerLayerZstd:
      return 'zstd'
    default:
      return undefined
  }
}

/** True when a media type is an image layer blobcache knows (so its compression may change). */
export function isKnownLayerMediaType(mediaType: string): boolean {
  return layerCompressionOf(mediaType) !== undefined
}

function layerFamily(mediaType: string): 'oci' | 'oci-nd' | 'docker' | 'docker-foreign' | undefined {
  if (mediaType.startsWith('application/vnd.oci.image.layer.nondistributable.v1.tar')) return 'oci-nd'
  if (mediaType.startsWith('application/vnd.oci.image.layer.v1.tar')) return 'oci'
  if (mediaType.startsWith('application/vnd.docker.image.rootfs.foreign.diff.tar')) return 'docker-foreign'
  if (mediaType.startsWith('application/vnd.docker.image.rootfs.diff.tar')) return 'docker'
  return undefined
}

/**
 * The media type of a layer after a compression change and, optionally, a format change.
 * Throws `UNSUPPORTED` for combinations Docker schema 2 cannot express (zstd layers).
 * Unknown media types are returned unchanged.
 */
export function layerMediaType(mediaType: string, algorithm: CompressionAlgorithm | null, format?: ManifestFormat): string {
  let family = layerFamily(mediaType)
  if (!family) return mediaType
  if (format === 'oci' && family === 'docker') family = 'oci'
  if (format === 'oci' && family === 'docker-foreign') family = 'oci-nd'
  if (format === 'v2s2' && family === 'oci') family = 'docker'
  if (format === 'v2s2' && family === 'oci-nd') family = 'docker-foreign'
  if (family === 'oci' || family === 'oci-nd') {
    const base = family === 'oci' ? MediaType.ociLayer : MediaType.ociLayerNondistributable
    return algorithm ? `${base}+${algorithm}` : base
  }
  if (algorithm === 'zstd') {
    throw new ImageError('UNSUPPORTED', 'zstd-compressed layers cannot be described by a Docker schema 2 manifest; use the OCI format')
  }
  const base = family === 'docker' ? MediaType.dockerLayer : 'application/vnd.docker.image.rootfs.foreign.diff.tar'
  return algorithm ? `${base}.gzip` : base
}

/** The format a manifest media type belongs to. */
export function manifestFormatOf(mediaType: string): ManifestFormat {
  return mediaType === MediaType.dockerManifest || mediaType === MediaType.dockerManifestList ? 'v2s2' : 'oci'
}

/** The media type of an image manifest (or, with `index`, a list) in a format. */
export function manifestMediaTypeFor(format: ManifestFormat, index = false): string {
  if (format === 'oci') return index ? MediaType.ociIndex : MediaType.ociManifest
  return index ? MediaType.dockerManifestList : MediaType.dockerManifest
}

/**
 * Converts an image manifest to another format (OCI <-> Docker schema 2): manifest, config and
 * layer media types change; digests, sizes and the config bytes do not. Docker schema 2 has no
 * annotations, so they are dropped there. Throws `UNSUPPORTED` for what schema 2 cannot hold
 * (non-image configs, zstd layers, artifacts).
 */
export function convertManifest(m: ImageManifest, to: ManifestFormat): ImageManifest {
  if (to === 'v2s2') {
    if (m.config.mediaType !== MediaType.ociConfig && m.config.mediaType !== MediaType.dockerConfig) {
      throw new ImageError('UNSUPPORTED', `config type ${m.config.mediaType} cannot be stored in a Docker schema 2 manifest`)
    }
    if (m.subject || m.artifactType) throw new ImageError('UNSUPPORTED', 'artifacts cannot be stored in a Docker schema 2 manifest')
    const strip = ({ annotations: _a, platform: _p, artifactType: _t, data: _d, ...rest }: Descriptor): Descriptor => rest
    return {
      schemaVersion: 2,
      mediaType: MediaType.dockerManifest,
      config: { ...strip(m.config), mediaType: MediaType.dockerConfig },
      layers: m.layers.map((l) => ({ ...strip(l), mediaType: convertLayerType(l.mediaType, 'v2s2') })),
    }
  }
  const out: ImageManifest = { schemaVersion: 2, mediaType: MediaType.ociManifest } as ImageManifest
  if (m.artifactType) out.artifactType = m.artifactType
  out.config = { ...m.config, mediaType: m.config.mediaType === MediaType.dockerConfig ? MediaType.ociConfig : m.config.mediaType }
  out.layers = m.layers.map((l) => ({ ...l, mediaType: convertLayerType(l.mediaType, 'oci') }))
  if (m.subject) out.subject = m.subject
  if (m.annotations) out.annotations = m.annotations
  return out
}

/** A layer's media type in another format; a type whose compression is unknown stays as it is. */
function convertLayerType(mediaType: string, to: ManifestFormat): string {
  const algorithm = layerCompressionOf(mediaType)
  return algorithm === undefined ? mediaType : layerMediaType(mediaType, algorithm, to)
}

/** Converts an index to another format; entries' media types follow their own conversion. */
export function convertIndex(ix: ImageIndex, to: ManifestFormat): ImageIndex {
  const entries = ix.manifests.map((d) => {
    const mediaType = isIndexMediaType(d.mediaType)
      ? manifestMediaTypeFor(to, true)
      : isImageManifestMediaType(d.mediaType)
        ? manifestMediaTypeFor(to)
        : d.mediaType
    if (to === 'v2s2') {
      const { annotations: _a, artifactType: _t, data: _d, ...rest } = d
      return { ...rest, mediaType }
    }
    return { ...d, mediaType }
  })
  const out = { schemaVersion: 2, mediaType: manifestMediaTypeFor(to, true) } as ImageIndex
  if (to === 'oci' && ix.artifactType) out.artifactType = ix.artifactType
  out.manifests = entries
  if (to === 'oci' && ix.subject) out.subject = ix.subject
  if (to === 'oci' && ix.annotations) out.annotations = ix.annotations
  return out
}
