// Merging index entries, deterministically: by the full platform (os, architecture, variant,
// os.version; linuxkit ignored the variant), in the order given, keeping each digest once and
// dropping attestations whose image has gone.
import type { Descriptor } from '../manifest.js'
import { REFERENCE_DIGEST, isAttestation, platformKey } from './platforms.js'

/** Removes repeated digests (the first stays) and attestations that describe no listed image. */
export function cleanEntries(entries: Descriptor[]): Descriptor[] {
  const seen = new Set<string>()
  const unique = entries.filter((d) => (seen.has(d.digest) ? false : (seen.add(d.digest), true)))
  const images = new Set(unique.filter((d) => !isAttestation(d)).map((d) => d.digest as string))
  return unique.filter((d) => {
    if (!isAttestation(d)) return true
    const ref = d.annotations?.[REFERENCE_DIGEST]
    return ref === undefined || images.has(ref)
  })
}

/**
 * Adds `add` to `base` as IndexWrite does: an entry with the platform of an existing image entry
 * replaces it in place; entries without a platform, and attestations, replace an entry of the
 * same digest or are appended; new platforms are appended in the order given. The result is
 * then cleaned ({@link cleanEntries}), so the same inputs always give the same bytes.
 */
export function mergeEntries(base: Descriptor[], add: Descriptor[]): Descriptor[] {
  const out = base.slice()
  for (const d of add) {
    let at = -1
    if (!isAttestation(d) && d.platform) {
      const key = platformKey(d.platform)
      at = out.findIndex((e) => !isAttestation(e) && e.platform !== undefined && platformKey(e.platform) === key)
    }
    if (at < 0) at = out.findIndex((e) => e.digest === d.digest)
    if (at >= 0) out[at] = d
    else out.push(d)
  }
  return cleanEntries(out)
}

/**
 * linuxkit's AppendIndex, for a push onto an existing remote index: every local entry, then the
 * remote image entries whose platform the local index lacks, then the remote attestations of
 * images that are still listed.
 */
export function appendRemote(local: Descriptor[], remote: Descriptor[]): Descriptor[] {
  const keys = new Set(local.filter((d) => !isAttestation(d) && d.platform).map((d) => platformKey(d.platform)))
  const out = local.slice()
  for (const d of remote) {
    if (isAttestation(d)) continue
    if (d.platform && keys.has(platformKey(d.platform))) continue
    if (!d.platform && out.some((e) => e.digest === d.digest)) continue
    out.push(d)
  }
  for (const d of remote) if (isAttestation(d)) out.push(d)
  return cleanEntries(out)
}
