// Platform choice for the image cache: which instances of an index a platform selects (with
// their attestations), whether a single image's config matches, and the full platform key that
// IndexWrite merges by (os, architecture, variant and os.version; linuxkit drops the variant).
import type { Digest } from '../digest.js'
import { ImageError, isImageError } from '../errors.js'
import {
  type Descriptor, type ImageIndex, type Platform, choosePlatform, formatPlatform, isAttestationDescriptor,
  normalizePlatform, parsePlatform,
} from '../manifest.js'

/** The annotation an attestation manifest uses to name the image it describes. */
export const REFERENCE_DIGEST = 'vnd.docker.reference.digest'
/** The annotation that marks an attestation manifest. */
export const REFERENCE_TYPE = 'vnd.docker.reference.type'

/** A platform given as a value or as `os/arch[/variant]`. */
export type PlatformLike = Platform | string

/** Parses `os/arch[/variant]` (or takes a Platform) and normalises it. Throws `PLATFORM_UNKNOWN`. */
export function toPlatform(p: PlatformLike): Platform {
  const platform = typeof p === 'string' ? parsePlatform(p) : p
  if (!platform || typeof platform.os !== 'string' || typeof platform.architecture !== 'string') {
    throw new ImageError('PLATFORM_UNKNOWN', `invalid platform ${JSON.stringify(p)}`)
  }
  return normalizePlatform(platform)
}

/**
 * The key two index entries are "the same platform" by: normalised os, architecture, variant
 * and os.version. '' for an entry without a platform.
 */
export function platformKey(p: Platform | undefined): string {
  if (!p) return ''
  const n = normalizePlatform(p)
  return [n.os, n.architecture, n.variant ?? '', n['os.version'] ?? ''].join('/')
}

/** True for an attestation entry (buildkit's `unknown/unknown` manifests and marked ones). */
export function isAttestation(d: Descriptor): boolean {
  return isAttestationDescriptor(d)
}

/** The attestation entries of `index` that describe the instance `digest`. */
export function attestationsFor(index: ImageIndex, digest: Digest): Descriptor[] {
  return index.manifests.filter((d) => isAttestation(d) && d.annotations?.[REFERENCE_DIGEST] === digest)
}

/**
 * The instance of `index` for `want`: an exact match first, then a compatible variant (an
 * `arm64/v8` request takes a plain `arm64` entry, `arm/v7` takes `arm/v6`). Undefined when the
 * index has none.
 */
export function chooseInstance(index: ImageIndex, want: Platform): Descriptor | undefined {
  try {
    return choosePlatform(index, want)
  } catch (err) {
    if (isImageError(err, 'PLATFORM_UNKNOWN')) return undefined
    throw err
  }
}

/** Image entries of an index that carry no platform (they are judged by their config). */
export function unplatformedInstances(index: ImageIndex): Descriptor[] {
  return index.manifests.filter((d) => !d.platform && !isAttestation(d))
}

/** The platform an image config declares, or undefined when it names none. */
export function configPlatform(config: Buffer | Record<string, unknown>): Platform | undefined {
  let doc: Record<string, unknown>
  try {
    doc = Buffer.isBuffer(config) ? (JSON.parse(config.toString('utf8')) as Record<string, unknown>) : config
  } catch {
    return undefined
  }
  if (typeof doc !== 'object' || doc === null) return undefined
  const { os, architecture, variant } = doc
  if (typeof os !== 'string' || typeof architecture !== 'string' || !os || !architecture) return undefined
  const p: Platform = { os, architecture }
  if (typeof variant === 'string' && variant) p.variant = variant
  const osVersion = doc['os.version']
  if (typeof osVersion === 'string' && osVersion) p['os.version'] = osVersion
  return p
}

/**
 * True when an image whose config declares `have` runs on `want`: same os and architecture,
 * and a variant that is equal, compatible (older arm), or unstated on either side.
 */
export function platformSatisfies(have: Platform | undefined, want: Platform): boolean {
  if (!have) return false
  const h = normalizePlatform(have)
  const w = normalizePlatform(want)
  if (h.os !== w.os || h.architecture !== w.architecture) return false
  if (w['os.version'] && h['os.version'] && w['os.version'] !== h['os.version']) return false
  if (!h.variant || !w.variant || h.variant === w.variant) return true
  if (h.architecture === 'arm') return Number(h.variant.slice(1)) <= Number(w.variant.slice(1))
  return false
}

/** The error for platforms an image does not offer (the message linuxkit users know). */
export function platformsMissing(name: string, missing: Platform[], offered: string[]): ImageError {
  const list = missing.map(formatPlatform).join(', ')
  return new ImageError(
    'PLATFORM_UNKNOWN',
    `image ${name} does not contain target platforms ${list} (offered: ${offered.join(', ') || 'none'})`,
  )
}

/** The platforms an index offers, as `os/arch[/variant]`, attestations left out. */
export function offeredPlatforms(index: ImageIndex): string[] {
  return index.manifests.filter((d) => d.platform && !isAttestation(d)).map((d) => formatPlatform(d.platform!))
}
