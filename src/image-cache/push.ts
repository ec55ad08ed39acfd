// Push: an image or index of the cache to a registry, after linuxkit's `cache push`. Without
// `override` an existing remote tag is left alone. An index pushed onto a different remote
// index is merged with it (local platforms win, remote-only platforms stay, dangling
// attestations go). Arch tags (`<tag>-<arch>`) name each platform's manifest, never `unknown`.
// The local index.json is never changed.
import debug from 'debug'
import { type Digest, digestOf } from '../digest.js'
import { ImageError } from '../errors.js'
import {
  type Descriptor, type ImageIndex, type ImageManifest, formatPlatform, normalizePlatform, parseManifest, serializeManifest,
} from '../manifest.js'
import { MediaType } from '../media-types.js'
import { pushManifest } from '../registry/manifests.js'
import { headBlob, uploadBlob } from '../registry/upload.js'
import { hasBlob, openVerifiedBlob, readBlobIfValid } from './blobs.js'
import { appendRemote, cleanEntries } from './merge.js'
import { REFERENCE_DIGEST, isAttestation } from './platforms.js'
import { type Remote, eachLimit } from './remote.js'

const log = debug('blobcache:image-cache:push')

/** Options of {@link pushRoot}. */
export interface PushOptions {
  /** Replace an existing remote tag (merging indexes). Default false: an existing tag is kept. */
  override?: boolean
  /** Also tag each platform's manifest as `<tag>-<arch>`. Default false. */
  archTags?: boolean
  signal?: AbortSignal
}

/** What a push did. */
export interface PushResult {
  /** The digest the remote name resolves to afterwards. */
  digest: Digest
  /** False when the remote tag existed and was left alone (or already matched). */
  pushed: boolean
  /** Tags written, the main one first. */
  tags: string[]
  /** Platforms left out of an index because neither the cache nor the registry had them whole. */
  dropped: string[]
}

/** Pushes the blobs of an image manifest that the registry lacks, then the manifest by digest. */
async function pushImage(dir: string, remote: Remote, d: Descriptor, bytes: Buffer, manifest: ImageManifest, signal?: AbortSignal): Promise<void> {
  const blobs = [manifest.config, ...manifest.layers]
  await eachLimit(blobs, 4, async (b) => {
    signal?.throwIfAborted()
    if ((await headBlob(remote.client, remote.repository, b.digest, signal)) !== undefined) return
    const { stream } = await openVerifiedBlob(dir, b.digest, { size: b.size, signal })
    await uploadBlob(remote.client, remote.repository, stream, { digest: b.digest, size: b.size, mediaType: b.mediaType }, { signal })
  })
  await pushManifest(remote.client, remote.repository, d.digest, bytes, d.mediaType, signal)
}

/** True when the cache holds a manifest and all of its blobs. */
async function localImage(dir: string, d: Descriptor): Promise<{ bytes: Buffer; manifest: ImageManifest } | undefined> {
  const bytes = await readBlobIfValid(dir, d.digest)
  if (!bytes) return undefined
  const parsed = parseManifest(bytes, d.mediaType)
  if (parsed.kind !== 'image') return undefined
  for (const b of [parsed.manifest.config, ...parsed.manifest.layers]) if (!(await hasBlob(dir, b))) return undefined
  return { bytes, manifest: parsed.manifest }
}

/**
 * Pushes the root `root` of the cache at `dir` to `remote` under `tag` (or by digest when
 * `tag` is undefined). See the module comment for the rules.
 */
export async function pushRoot(dir: string, root: Descriptor, remote: Remote, tag: string | undefined, opts: PushOptions = {}): Promise<PushResult> {
  const { signal } = opts
  const target = tag ?? root.digest
  const existing = await remote.manifestIfExists(target, signal)
  if (existing && !opts.override) {
    log('%s:%s exists (%s); not overriding', remote.where, target, existing.digest)
    return { digest: existing.digest, pushed: false, tags: [], dropped: [] }
  }
  const rootBytes = await readBlobIfValid(dir, root.digest)
  if (!rootBytes) throw new ImageError('BLOB_UNKNOWN', `manifest ${root.digest} is not in the cache`)
  const parsed = parseManifest(rootBytes, root.mediaType)
  if (parsed.kind === 'image') {
    if (existing?.digest === root.digest) return { digest: root.digest, pushed: false, tags: [], dropped: [] }
    const image = await localImage(dir, root)
    if (!image) throw new ImageError('BLOB_UNKNOWN', `image ${root.digest} is not complete in the cache`)
    await pushImage(dir, remote, root, rootBytes, image.manifest, signal)
    if (tag) await pushManifest(remote.client, remote.repository, tag, rootBytes, root.mediaType, signal)
    return { digest: root.digest, pushed: true, tags: tag ? [tag] : [], dropped: [] }
  }

  // an index: merge with a different remote index, then push what the cache holds whole
  let entries = parsed.index.manifests
  let remoteEntries: Descriptor[] = []
  if (existing && existing.digest !== root.digest) {
    const theirs = parseManifest(existing.bytes, existing.mediaType)
    if (theirs.kind === 'index') {
      remoteEntries = theirs.index.manifests
      entries = appendRemote(entries, remoteEntries)
    }
  }
  const dropped: string[] = []
  const kept: Descriptor[] = []
  const local = new Map<Digest, { bytes: Buffer; manifest: ImageManifest }>()
  for (const d of entries) {
    const image = await localImage(dir, d)
    if (image) {
      local.set(d.digest, image)
      kept.push(d)
    } else if (remoteEntries.some((r) => r.digest === d.digest) || (await remote.manifestIfExists(d.digest, signal))) {
      kept.push(d) // the registry has it already
    } else {
      dropped.push(d.platform ? formatPlatform(d.platform) : d.digest)
    }
  }
  entries = cleanEntries(kept)
  const unchanged = entries.length === parsed.index.manifests.length && entries.every((d, i) => d === parsed.index.manifests[i])
  const index: ImageIndex = { ...parsed.index, manifests: entries }
  if (!unchanged && index.mediaType === MediaType.dockerManifestList && entries.some((d) => d.mediaType.startsWith('application/vnd.oci.'))) {
    index.mediaType = MediaType.ociIndex
  }
  const bytes = unchanged ? rootBytes : serializeManifest(index)
  const digest = unchanged ? root.digest : digestOf(bytes)
  const mediaType = unchanged ? root.mediaType : (index.mediaType ?? MediaType.ociIndex)
  if (dropped.length) log('push %s: left out %s (not whole in the cache or the registry)', remote.where, dropped.join(', '))

  await eachLimit(entries.filter((d) => local.has(d.digest)), 2, async (d) => {
    const image = local.get(d.digest)!
    await pushImage(dir, remote, d, image.bytes, image.manifest, signal)
  })
  await pushManifest(remote.client, remote.repository, target, bytes, mediaType, signal)
  const tags = tag ? [tag] : []
  if (opts.archTags && tag) {
    for (const [suffix, d] of archTagsOf(entries)) {
      const child = local.get(d.digest)?.bytes ?? (await remote.manifest(d.digest, signal)).bytes
      await pushManifest(remote.client, remote.repository, `${tag}-${suffix}`, child, d.mediaType, signal)
      tags.push(`${tag}-${suffix}`)
    }
  }
  log('pushed %s to %s:%s%s', digest, remote.where, target, tags.length > 1 ? ` (+${tags.length - 1} arch tags)` : '')
  return { digest, pushed: true, tags, dropped }
}

/**
 * The arch tag suffix of each image entry: its architecture, plus the variant when the index
 * has several variants of that architecture (`arm-v6`, `arm-v7`). Attestations and `unknown`
 * platforms get none.
 */
export function archTagsOf(entries: Descriptor[]): [string, Descriptor][] {
  const images = entries.filter((d) => d.platform && !isAttestation(d) && d.platform.architecture !== 'unknown' && !d.annotations?.[REFERENCE_DIGEST])
  const count = new Map<string, number>()
  for (const d of images) count.set(d.platform!.architecture, (count.get(d.platform!.architecture) ?? 0) + 1)
  const out = new Map<string, Descriptor>()
  for (const d of images) {
    const p = normalizePlatform(d.platform!)
    const suffix = (count.get(d.platform!.architecture) ?? 0) > 1 && p.variant ? `${p.architecture}-${p.variant}` : p.architecture
    if (!out.has(suffix)) out.set(suffix, d)
  }
  return [...out]
}
