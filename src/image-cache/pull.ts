// What an image needs for a set of platforms, checked locally (no network) or fetched from a
// registry. Both walk the same way: the root (an index or an image), the instance each platform
// selects (an exact platform, a compatible variant, or an instance without a platform whose
// config matches), the attestations of those instances, and their configs and layers. Nothing
// of another platform is read or fetched.
import debug from 'debug'
import type { Digest } from '../digest.js'
import { ImageError } from '../errors.js'
import { MAX_CONFIG_SIZE } from '../image.js'
import { type Descriptor, type ImageIndex, type ImageManifest, type Platform, formatPlatform, parseManifest } from '../manifest.js'
import { blobIntact, hasBlob, readBlobIfValid, writeBlobBytes } from './blobs.js'
import {
  attestationsFor, chooseInstance, configPlatform, offeredPlatforms, platformSatisfies, platformsMissing,
  unplatformedInstances,
} from './platforms.js'
import { type Remote, eachLimit, manifestReference } from './remote.js'

const log = debug('blobcache:image-cache:pull')

/** Reads manifests and configs from somewhere (the cache, or the registry through the cache). */
interface Reader {
  manifest(d: Descriptor): Promise<Buffer | undefined>
  config(d: Descriptor): Promise<Buffer | undefined>
}

/** An image selected for a platform: its descriptor and parsed manifest. */
export interface SelectedImage {
  descriptor: Descriptor
  manifest: ImageManifest
  /** The attestation manifests describing it. */
  attestations: { descriptor: Descriptor; manifest: ImageManifest }[]
}

/** The result of a selection: the images found, and what is missing (empty when complete). */
export interface Selection {
  images: SelectedImage[]
  /** Platforms the root does not offer. */
  absent: Platform[]
  /** Human-readable items missing from the cache (`layer sha256:… not found`). */
  missing: string[]
  /** Every blob the selection needs: root, manifests, configs, layers. */
  blobs: Descriptor[]
}

function parseImage(bytes: Buffer, d: Descriptor): ImageManifest | undefined {
  const parsed = parseManifest(bytes, d.mediaType)
  return parsed.kind === 'image' ? parsed.manifest : undefined
}

/** Finds the instance of an index for `want`, judging unplatformed instances by their config. */
async function instanceFor(index: ImageIndex, want: Platform, reader: Reader): Promise<Descriptor | undefined> {
  const chosen = chooseInstance(index, want)
  if (chosen) return chosen
  for (const d of unplatformedInstances(index)) {
    const bytes = await reader.manifest(d)
    const manifest = bytes && parseImage(bytes, d)
    if (!manifest) continue
    const config = await reader.config(manifest.config)
    if (config && platformSatisfies(configPlatform(config), want)) return d
  }
  return undefined
}

/**
 * Selects the images `platforms` need under `root`, reading through `reader`. Items the reader
 * cannot produce are listed in `missing`; platforms the root does not offer in `absent`.
 */
async function select(root: Descriptor, rootBytes: Buffer, platforms: Platform[], reader: Reader, attestations: AttestationMode): Promise<Selection> {
  const sel: Selection = { images: [], absent: [], missing: [], blobs: [root] }
  const parsed = parseManifest(rootBytes, root.mediaType)
  const addImage = async (d: Descriptor, manifest: ImageManifest, index?: ImageIndex) => {
    if (sel.images.some((i) => i.descriptor.digest === d.digest)) return
    const image: SelectedImage = { descriptor: d, manifest, attestations: [] }
    sel.images.push(image)
    if (d !== root) sel.blobs.push(d)
    sel.blobs.push(manifest.config, ...manifest.layers)
    if (!attestations || !index) return
    for (const a of attestationsFor(index, d.digest)) {
      const bytes = await reader.manifest(a)
      const m = bytes && parseImage(bytes, a)
      if (!m) {
        if (attestations === 'require') sel.missing.push(`attestation manifest ${a.digest} not found`)
        continue
      }
      image.attestations.push({ descriptor: a, manifest: m })
      sel.blobs.push(a, m.config, ...m.layers)
    }
  }
  if (parsed.kind === 'index') {
    for (const want of platforms) {
      const d = await instanceFor(parsed.index, want, reader)
      if (!d) {
        sel.absent.push(want)
        continue
      }
      const bytes = await reader.manifest(d)
      if (!bytes) {
        sel.missing.push(`manifest ${d.digest} (${formatPlatform(want)}) not found`)
        continue
      }
      const manifest = parseImage(bytes, d)
      if (!manifest) throw new ImageError('UNSUPPORTED', `${d.digest}: nested image indexes are not supported`)
      await addImage(d, manifest, parsed.index)
    }
    return sel
  }
  const config = await reader.config(parsed.manifest.config)
  const have = config && configPlatform(config)
  for (const want of platforms) {
    // a config that names no platform (an artifact) cannot be judged, and is taken as it is
    if (config && have && !platformSatisfies(have, want)) sel.absent.push(want)
  }
  await addImage(root, parsed.manifest)
  return sel
}

/** Whether attestations of the selected images are needed, taken when present, or ignored. */
export type AttestationMode = 'require' | 'optional' | false

/** Options of {@link checkLocal}. */
export interface LocalCheckOptions {
  /** Attestations of the selected images: required, taken when present, or ignored. Default false. */
  attestations?: AttestationMode
  /** Hash every layer instead of checking its size. Default false. */
  verifyLayers?: boolean
}

/**
 * Checks, without the network, that the cache holds everything `platforms` need under `root`:
 * manifests and configs whole (hashed, they are small) and layers of the right size (or hashed
 * with `verifyLayers`). Resolves the selection; it is complete when `missing` and `absent` are
 * both empty.
 */
export async function checkLocal(dir: string, root: Descriptor, platforms: Platform[], opts: LocalCheckOptions = {}): Promise<Selection> {
  const rootBytes = await readBlobIfValid(dir, root.digest)
  if (!rootBytes) return { images: [], absent: [], missing: [`manifest ${root.digest} not found`], blobs: [root] }
  const reader: Reader = {
    manifest: (d) => readBlobIfValid(dir, d.digest),
    config: (d) => readBlobIfValid(dir, d.digest),
  }
  const sel = await select(root, rootBytes, platforms, reader, opts.attestations ?? false)
  for (const image of sel.images) {
    if (opts.attestations === 'optional') {
      const whole = []
      for (const a of image.attestations) if (await allPresent(dir, [a.manifest.config, ...a.manifest.layers])) whole.push(a)
      image.attestations = whole
    }
    const blobs = [image.manifest.config, ...image.manifest.layers, ...image.attestations.flatMap((a) => [a.manifest.config, ...a.manifest.layers])]
    for (const b of blobs) {
      const ok = opts.verifyLayers ? await blobIntact(dir, b.digest) : await hasBlob(dir, b)
      if (!ok) sel.missing.push(`${b === image.manifest.config ? 'config' : 'layer'} ${b.digest} not found${opts.verifyLayers ? ' or damaged' : ''}`)
    }
  }
  return sel
}

async function allPresent(dir: string, blobs: Descriptor[]): Promise<boolean> {
  for (const b of blobs) if (!(await hasBlob(dir, b))) return false
  return true
}

/** Options of {@link pullFromRegistry}. */
export interface RemotePullOptions {
  signal?: AbortSignal
  /** Blobs downloaded at once. Default 6. */
  concurrency?: number
}

/** What a pull fetched. */
export interface PullResult {
  /** The root as the registry serves it (its media type, digest and size). */
  root: Descriptor
  /** Every blob the selection needs (to re-check under the index lock). */
  blobs: Descriptor[]
  downloaded: number
  bytes: number
}

/**
 * Fetches the root of `remote`'s reference, selects what `platforms` need (failing
 * `PLATFORM_UNKNOWN` before anything is named when one is not offered), and stores every
 * manifest, config and layer the cache lacks. Manifests and configs already in the cache are
 * read from it (no request); layers already present with the right size are not fetched.
 */
export async function pullFromRegistry(dir: string, remote: Remote, platforms: Platform[], opts: RemotePullOptions = {}): Promise<PullResult> {
  const { signal } = opts
  const reference = manifestReference(remote.named)
  const top = await remote.manifest(reference, signal)
  const root: Descriptor = { mediaType: top.mediaType, digest: top.digest, size: top.bytes.length }
  const fetched = new Map<Digest, Buffer>()
  const reader: Reader = {
    manifest: async (d) => {
      const local = await readBlobIfValid(dir, d.digest)
      if (local) return local
      const m = await remote.manifest(d.digest, signal)
      fetched.set(d.digest, m.bytes)
      return m.bytes
    },
    config: async (d) => {
      const local = await readBlobIfValid(dir, d.digest)
      if (local) return local
      const bytes = await remote.blobBytes(d, MAX_CONFIG_SIZE, signal)
      fetched.set(d.digest, bytes)
      return bytes
    },
  }
  const sel = await select(root, top.bytes, platforms, reader, 'require')
  const offered = parseOffered(top.bytes, root)
  if (sel.absent.length) throw platformsMissing(remote.named.toString(), sel.absent, offered)
  if (sel.missing.length) throw new ImageError('MANIFEST_UNKNOWN', `${remote.where}: ${sel.missing.join('; ')}`)
  const layers = new Map<Digest, Descriptor>()
  for (const b of sel.blobs) if (!fetched.has(b.digest) && b.digest !== root.digest && !isManifestOf(sel, b)) layers.set(b.digest, b)
  let downloaded = 0
  let bytes = 0
  // the manifests and configs fetched are stored while the layers download
  const small = Promise.all([...fetched].map(([digest, b]) => writeBlobBytes(dir, b, digest, { durable: false })))
  const large = eachLimit([...layers.values()], opts.concurrency ?? 6, async (b) => {
    signal?.throwIfAborted()
    if (await hasBlob(dir, b)) return
    bytes += await remote.download(dir, b, signal)
    downloaded++
  })
  const stored = await Promise.allSettled([small, large])
  for (const r of stored) if (r.status === 'rejected') throw r.reason
  await writeBlobBytes(dir, top.bytes, root.digest, { durable: false })
  log('pulled %s (%s): %d blobs downloaded (%d bytes), %d present', remote.named.toString(), root.digest, downloaded, bytes, layers.size - downloaded)
  return { root, blobs: sel.blobs, downloaded, bytes }
}

function isManifestOf(sel: Selection, b: Descriptor): boolean {
  return sel.images.some((i) => i.descriptor.digest === b.digest || i.attestations.some((a) => a.descriptor.digest === b.digest))
}

function parseOffered(bytes: Buffer, root: Descriptor): string[] {
  const parsed = parseManifest(bytes, root.mediaType)
  return parsed.kind === 'index' ? offeredPlatforms(parsed.index) : []
}

/**
 * True when the registry offers `remote`'s reference for `want`; false when it has no such
 * manifest (or repository) or the image is for other platforms. Network and auth failures
 * reject: "cannot tell" is not "absent".
 */
export async function registryOffers(remote: Remote, want: Platform, signal?: AbortSignal): Promise<boolean> {
  const top = await remote.manifestIfExists(manifestReference(remote.named), signal)
  if (!top) return false
  const root: Descriptor = { mediaType: top.mediaType, digest: top.digest, size: top.bytes.length }
  const parsed = parseManifest(top.bytes, root.mediaType)
  const reader: Reader = {
    manifest: async (d) => (await remote.manifestIfExists(d.digest, signal))?.bytes,
    config: (d) => remote.blobBytes(d, MAX_CONFIG_SIZE, signal),
  }
  if (parsed.kind === 'index') return (await instanceFor(parsed.index, want, reader)) !== undefined
  const config = await reader.config(parsed.manifest.config)
  return platformSatisfies(configPlatform(config!), want)
}
