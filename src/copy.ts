import debug from 'debug'
import { setMaxListeners } from 'node:events'
import { compressStream } from './compression.js'
import { BlobCopier, type BlobOutcome, type BlobRequest, type CompressionStep, type CopyProgressEvent, compressionStep } from './copy-blob.js'
import { type Digest, digestAlgorithm, digestOf, parseDigest } from './digest.js'
import { DigestMismatchError, type ErrorCode, ImageError } from './errors.js'
import { type SourceManifest, descriptorInfo, readManifest } from './image.js'
import {
  type Descriptor, type ImageIndex, type ImageManifest, type ManifestFormat, type Platform, choosePlatform, convertIndex,
  convertManifest, currentPlatform, formatPlatform, isKnownLayerMediaType, layerCompressionOf, layerMediaType,
  manifestFormatOf, manifestMediaTypeFor, serializeManifest,
} from './manifest.js'
import { MediaType, isImageManifestMediaType, isIndexMediaType } from './media-types.js'
import type {
  BlobInfo, CallOptions, CompressionAlgorithm, DetectedAlgorithm, ImageDestination, ImageReference, ImageSource,
  LayerCompression, SystemContext,
} from './types.js'

export type { CopyProgressEvent } from './copy-blob.js'

const log = debug('blobcache:copy')

/** Options of {@link copyImage}. Every field is optional; each states its default. */
export interface CopyOptions extends CallOptions {
  /** For a list: copy the instance for `platform` only (`single`, the default), or every instance (`all`). */
  imageListSelection?: 'single' | 'all'
  /** Platform chosen from a list with `single`. Default: the running platform. */
  platform?: Platform
  /** What to do to layer compression. Default: what the destination desires. */
  compression?: LayerCompression
  /** Algorithm for `compress`; when given, layers in another algorithm are recompressed. Default gzip. */
  compressionAlgorithm?: CompressionAlgorithm
  /** Compression level for the algorithm. Default: the algorithm's own. */
  compressionLevel?: number
  /** Manifest format to write. Default: the source's, if the destination accepts it. */
  manifestFormat?: ManifestFormat
  /** Fail with `DIGESTS_NOT_PRESERVED`, before writing anything, if the manifest digest would change. Default false. */
  preserveDigests?: boolean
  /** Drop the source's signatures. Default false: copy them, or fail if that is impossible. */
  removeSignatures?: boolean
  /**
   * Write an image again even when the destination already holds its manifest, unchanged, under
   * the name it would be written to. Default false: such an image is skipped with its blobs, as
   * crane does (only destinations with `hasManifest`, docker://, can tell).
   */
  rewriteExisting?: boolean
  /** Layers copied at once. Default 6. */
  concurrency?: number
  /** Called for each blob event; MUST NOT throw. */
  onProgress?: (e: CopyProgressEvent) => void
  /** Context for opening the source. */
  sourceCtx?: SystemContext
  /** Context for opening the destination. */
  destCtx?: SystemContext
}

/** What {@link copyImage} wrote. */
export interface CopyResult {
  /** The top-level manifest written (the index with `all`). */
  manifest: Buffer
  digest: Digest
  mediaType: string
  /** Blobs copied (read and written). */
  copied: number
  /** Blobs the destination already had. */
  reused: number
  /** Bytes written to the destination by copied blobs. */
  bytes: number
  /**
   * Manifests not written, and their blobs with them, because the destination already held
   * each, unchanged, under the name it would have been given. With the top-level `digest` here,
   * the copy wrote nothing at all.
   */
  present: Digest[]
}

/** Why the manifest digest must not change, and which error says so. */
interface Constraint {
  code: Extract<ErrorCode, 'DIGESTS_NOT_PRESERVED' | 'SIGNATURES_UNSUPPORTED'>
  why: string
}

interface LayerEntry {
  original: Descriptor
  /** What is read from the source: the manifest's layer, or the source's substitute. */
  info: BlobInfo & { digest: Digest }
  substituted: boolean
  /** A known layer media type, whose compression may change. */
  known: boolean
  declared: DetectedAlgorithm | null | undefined
  mayTransform: boolean
  /** The change the media type predicts. */
  planned?: CompressionStep
}

interface ImagePlan {
  kind: 'image'
  source: SourceManifest & { kind: 'image' }
  instance?: Digest
  layers: LayerEntry[]
  sigs: Buffer[]
  constraint?: Constraint
  format: ManifestFormat
}

interface IndexPlan {
  kind: 'index'
  source: SourceManifest & { kind: 'index' }
  instance?: Digest
  children: (ImagePlan | IndexPlan | OpaquePlan)[]
  sigs: Buffer[]
  constraint?: Constraint
  format: ManifestFormat
}

/** An index entry whose manifest blobcache cannot interpret: copied byte for byte. */
interface OpaquePlan {
  kind: 'opaque'
  descriptor: Descriptor
  bytes: Buffer
}

interface Written {
  bytes: Buffer
  digest: Digest
  mediaType: string
  changed: boolean
}

/** Annotations that describe the exact bytes of a zstd:chunked layer; wrong once it changes. */
const CHUNKED_ANNOTATIONS = [
  'io.github.containers.zstd-chunked.manifest-checksum', 'io.github.containers.zstd-chunked.manifest-position',
  'io.github.containers.zstd-chunked.tarsplit-position', 'io.github.containers.zstd-chunked.tarsplit-checksum',
  'containerd.io/snapshot/stargz/toc.digest',
]

const MAX_INDEX_DEPTH = 4

/**
 * Copies an image (or, with `imageListSelection: 'all'`, a whole list) from `src` to `dest`.
 * Layers are copied concurrently and verified against their source digests as they stream;
 * layer compression and manifest format change as the options and the destination ask, and
 * the manifest is rewritten only then (otherwise its bytes are copied exactly). The
 * destination is committed only when everything succeeded; both ends are always closed.
 * An abort rejects with `signal.reason`.
 */
export async function copyImage(src: ImageReference, dest: ImageReference, opts: CopyOptions = {}): Promise<CopyResult> {
  opts.signal?.throwIfAborted()
  const internal = new AbortController()
  const signal = opts.signal ? AbortSignal.any([opts.signal, internal.signal]) : internal.signal
  // Every concurrent blob pipeline listens on this one signal; the default cap of 10 would warn.
  setMaxListeners(0, signal)
  const name = `${src.transport.name}:${src.stringWithinTransport()}`
  log('copy %s -> %s:%s', name, dest.transport.name, dest.stringWithinTransport())
  let source: ImageSource | undefined
  let destination: ImageDestination | undefined
  let result: CopyResult | undefined
  let failure: { err: unknown } | undefined
  try {
    source = await src.newImageSource({ ...opts.sourceCtx, signal: opts.sourceCtx?.signal ?? opts.signal })
    destination = await dest.newImageDestination({ ...opts.destCtx, signal: opts.destCtx?.signal ?? opts.signal })
    destination.warmUp?.({ manifest: mayFindManifest(destination, opts) })
    result = await new ImageCopier(source, destination, name, opts, signal, internal).run()
    // a destination that already held the whole image was given nothing to commit
    if (!result.present.includes(result.digest)) await destination.commit({ signal })
    log('committed %s (%s): %d copied, %d reused', result.digest, result.mediaType, result.copied, result.reused)
  } catch (err) {
    failure = { err }
    internal.abort(err)
  }
  const closed = await Promise.allSettled([destination?.close(), source?.close()])
  if (failure) {
    for (const c of closed) if (c.status === 'rejected') log('close after failure: %O', c.reason)
    if (opts.signal?.aborted) throw opts.signal.reason
    throw failure.err
  }
  for (const c of closed) if (c.status === 'rejected') throw c.reason
  return result!
}

class ImageCopier {
  readonly copier: BlobCopier
  readonly op: LayerCompression
  readonly algorithm: CompressionAlgorithm
  readonly explicitCompression: boolean
  readonly supported: string[] | undefined
  readonly present: Digest[] = []

  constructor(
    readonly src: ImageSource,
    readonly dest: ImageDestination,
    readonly name: string,
    readonly opts: CopyOptions,
    readonly signal: AbortSignal,
    readonly internal: AbortController,
  ) {
    this.op = opts.compression ?? dest.desiredLayerCompression()
    if (!['preserve', 'compress', 'decompress'].includes(this.op)) {
      throw new ImageError('UNSUPPORTED', `unknown layer compression ${JSON.stringify(this.op)}`)
    }
    this.algorithm = opts.compressionAlgorithm ?? 'gzip'
    if (this.algorithm !== 'gzip' && this.algorithm !== 'zstd') {
      throw new ImageError('UNSUPPORTED', `cannot compress with ${JSON.stringify(this.algorithm)}`)
    }
    if (opts.compressionLevel !== undefined) compressStream(this.algorithm, { level: opts.compressionLevel }).destroy()
    this.explicitCompression = opts.compression !== undefined || opts.compressionAlgorithm !== undefined
    this.supported = dest.supportedManifestMIMETypes()
    const concurrency = Math.max(1, Math.floor(opts.concurrency ?? 6))
    this.copier = new BlobCopier(src, dest, {
      signal, op: this.op, algorithm: this.algorithm, explicitAlgorithm: opts.compressionAlgorithm !== undefined,
      level: opts.compressionLevel, concurrency, onProgress: opts.onProgress,
    })
    log('layer compression %s (%s), algorithm %s', this.op, opts.compression ? 'asked' : 'destination', this.algorithm)
  }

  async run(): Promise<CopyResult> {
    const top = await readManifest(this.src, undefined, { signal: this.signal })
    let written: Written
    if (top.kind === 'index' && this.opts.imageListSelection === 'all') {
      if (!this.dest.acceptsImageLists()) {
        throw new ImageError('UNSUPPORTED', `${this.dest.reference.transport.name}: destination cannot store an image list; copy a single platform instead`)
      }
      const plan = await this.planIndex(top, undefined, undefined, 0)
      this.settleIndexFormat(plan)
      written = await this.writeIndex(plan, true)
    } else {
      let image = top
      let instance: Digest | undefined
      if (top.kind === 'index') {
        const chosen = choosePlatform(top.index, this.opts.platform ?? currentPlatform())
        log('chose %s for %s', chosen.digest, formatPlatform(chosen.platform!))
        instance = chosen.digest
        image = await readManifest(this.src, instance, { signal: this.signal })
        if (image.kind !== 'image') throw new ImageError('MANIFEST_INVALID', `list entry ${instance} is not an image manifest`)
      }
      const plan = await this.planImage(image as SourceManifest & { kind: 'image' }, instance, undefined)
      this.settleImageFormat(plan, undefined)
      written = await this.writeImage(plan, false)
    }
    const { copied, reused, bytes } = this.copier
    return { manifest: written.bytes, digest: written.digest, mediaType: written.mediaType, copied, reused, bytes, present: this.present }
  }

  /** Signatures to copy, and the constraint they (or preserveDigests, or a signed parent) put on the manifest. */
  async signatures(instance: Digest | undefined, parent: Constraint | undefined): Promise<{ sigs: Buffer[]; constraint?: Constraint }> {
    let sigs = await this.src.getSignatures(instance, { signal: this.signal })
    if (sigs.length > 0 && this.opts.removeSignatures) {
      log('dropping %d signature(s) of %s', sigs.length, instance ?? this.name)
      sigs = []
    }
    if (sigs.length > 0 && !this.dest.putSignatures) {
      throw new ImageError('SIGNATURES_UNSUPPORTED',
        `${this.name} is signed, and ${this.dest.reference.transport.name}: destinations cannot store signatures; ` +
        'use --remove-signatures (removeSignatures: true) to copy without them')
    }
    if (this.opts.preserveDigests) return { sigs, constraint: { code: 'DIGESTS_NOT_PRESERVED', why: 'digests must be preserved' } }
    if (parent) return { sigs, constraint: parent }
    if (sigs.length > 0) {
      return { sigs, constraint: { code: 'SIGNATURES_UNSUPPORTED', why: 'the image is signed and a changed manifest would invalidate its signatures; use --remove-signatures (removeSignatures: true) to copy without them' } }
    }
    return { sigs }
  }

  async planImage(source: SourceManifest & { kind: 'image' }, instance: Digest | undefined, parent: Constraint | undefined): Promise<ImagePlan> {
    const { sigs, constraint } = await this.signatures(instance, parent)
    const manifest = source.manifest
    const substitutes = await this.src.layerInfosForCopy?.(instance, { signal: this.signal })
    if (substitutes && substitutes.length !== manifest.layers.length) {
      throw new ImageError('UNSUPPORTED', `source offers ${substitutes.length} layers for a manifest of ${manifest.layers.length}`)
    }
    const layers = manifest.layers.map((original, i): LayerEntry => {
      const sub = substitutes?.[i]
      const substituted = sub !== undefined && sub.digest !== undefined && parseDigest(sub.digest) !== original.digest
      const info = substituted ? { ...descriptorInfo(original), ...sub, digest: sub.digest! } : { ...descriptorInfo(original), digest: original.digest }
      if (substituted) {
        if (sub.annotations === undefined) delete info.annotations
        delete info.urls
        log('layer %s: source substitutes %s (%s)', original.digest, info.digest, info.mediaType)
      }
      const mediaType = info.mediaType ?? original.mediaType
      const known = isKnownLayerMediaType(mediaType)
      const declared = declaredCompression(info, mediaType)
      const mayTransform = known && this.op !== 'preserve'
      const planned = mayTransform && declared !== undefined ? compressionStep(declared, this.op, this.algorithm, this.opts.compressionAlgorithm !== undefined) : undefined
      return { original, info, substituted, known, declared, mayTransform, planned }
    })
    if (constraint && !this.explicitCompression && layers.some((l) => l.mayTransform)) {
      log('%s: the manifest must not change (%s): layers keep their compression', instance ?? this.name, constraint.why)
      for (const l of layers) {
        l.mayTransform = false
        l.planned = undefined
      }
    }
    return { kind: 'image', source, instance, layers, sigs, constraint, format: manifestFormatOf(source.mediaType) }
  }

  async planIndex(source: SourceManifest & { kind: 'index' }, instance: Digest | undefined, parent: Constraint | undefined, depth: number): Promise<IndexPlan> {
    if (depth >= MAX_INDEX_DEPTH) throw new ImageError('UNSUPPORTED', `image lists nested more than ${MAX_INDEX_DEPTH} deep`)
    const { sigs, constraint } = await this.signatures(instance, parent)
    const children: IndexPlan['children'] = []
    for (const d of source.index.manifests) {
      if (isImageManifestMediaType(d.mediaType) || isIndexMediaType(d.mediaType)) {
        const child = await readManifest(this.src, d.digest, { signal: this.signal })
        children.push(child.kind === 'image'
          ? await this.planImage(child, d.digest, constraint)
          : await this.planIndex(child, d.digest, constraint, depth + 1))
      } else {
        const { bytes } = await this.src.getManifest(d.digest, { signal: this.signal })
        const actual = digestOf(bytes, digestAlgorithm(d.digest))
        if (actual !== d.digest) throw new DigestMismatchError(d.digest, actual)
        log('list entry %s (%s) copied as is', d.digest, d.mediaType)
        children.push({ kind: 'opaque', descriptor: d, bytes })
      }
    }
    return { kind: 'index', source, instance, children, sigs, constraint, format: manifestFormatOf(source.mediaType) }
  }

  /** Chooses the format of an image manifest (switching v2s2 to OCI for zstd) and checks the constraint. */
  settleImageFormat(plan: ImagePlan, listFormat: ManifestFormat | undefined): void {
    const forced = this.opts.manifestFormat
    let format = listFormat === 'v2s2' && !forced ? 'v2s2' : chooseFormat(plan.source.mediaType, this.supported, forced, false)
    if (format === 'v2s2' && needsOci(plan)) {
      if (forced) throw new ImageError('UNSUPPORTED', 'zstd-compressed layers cannot be described by a Docker schema 2 manifest; use the OCI format')
      if (!accepts(this.supported, MediaType.ociManifest)) {
        throw new ImageError('UNSUPPORTED', 'zstd-compressed layers need an OCI manifest, which the destination does not accept')
      }
      log('%s: zstd layers: writing an OCI manifest instead of Docker schema 2', plan.instance ?? this.name)
      format = 'oci'
    }
    plan.format = format
    const changes: string[] = []
    if (format !== manifestFormatOf(plan.source.mediaType)) changes.push(`the manifest would be converted to ${format}`)
    for (const l of plan.layers) {
      if (l.substituted) changes.push(`layer ${l.original.digest} would be replaced by the source's variant ${l.info.digest}`)
      else if (l.planned) changes.push(`layer ${l.original.digest} would be ${describeStep(l.planned)}`)
    }
    if (plan.constraint && changes.length > 0) refuse(plan.constraint, plan.instance ?? this.name, changes)
    if (format !== manifestFormatOf(plan.source.mediaType)) log('%s: converting the manifest to %s', plan.instance ?? this.name, format)
  }

  settleIndexFormat(plan: IndexPlan): void {
    const forced = this.opts.manifestFormat
    let format = chooseFormat(plan.source.mediaType, this.supported, forced, true)
    if (format === 'v2s2' && !forced && anyNeedsOci(plan)) {
      if (!accepts(this.supported, MediaType.ociIndex)) {
        throw new ImageError('UNSUPPORTED', 'zstd-compressed layers need an OCI index, which the destination does not accept')
      }
      log('zstd layers: writing an OCI index instead of a Docker manifest list')
      format = 'oci'
    }
    const setFormats = (p: IndexPlan) => {
      p.format = format
      if (p.constraint && format !== manifestFormatOf(p.source.mediaType)) {
        refuse(p.constraint, p.instance ?? this.name, [`the list would be converted to ${format}`])
      }
      for (const c of p.children) {
        if (c.kind === 'image') this.settleImageFormat(c, format)
        else if (c.kind === 'index') setFormats(c)
      }
    }
    setFormats(plan)
  }

  /**
   * Copies the layers of one image and its config (unchanged, so it need not wait for them: a
   * re-push asks the registry about all of them at once) concurrently; on the first failure
   * stops the others and waits for them. Resolves the layers' outcomes.
   */
  async copyBlobs(plan: ImagePlan): Promise<BlobOutcome[]> {
    let first: { err: unknown } | undefined
    const config = plan.source.manifest.config
    const requests: BlobRequest[] = plan.layers.map((l) => ({
      info: l.info, kind: 'layer', mayTransform: l.mayTransform, declared: l.declared, acceptVariant: !plan.constraint,
    }))
    requests.push({ info: { ...descriptorInfo(config), digest: config.digest }, kind: 'config', mayTransform: false, declared: undefined, acceptVariant: false })
    const tasks = requests.map((r) =>
      this.copier.copy(r).catch((err: unknown) => {
        if (!first) {
          first = { err }
          this.internal.abort(err)
        }
        throw err
      }),
    )
    const settled = await Promise.allSettled(tasks)
    if (first) throw first.err
    return settled.slice(0, plan.layers.length).map((s) => (s as PromiseFulfilledResult<BlobOutcome>).value)
  }

  /**
   * Whether the destination already holds the manifest of `plan` as the copy would write it,
   * under the name it would get: asked only when the copy would change nothing (same format, no
   * substitute, no compression step, no signatures to add), since only then is that manifest the
   * source's own.
   */
  async alreadyPresent(plan: ImagePlan | IndexPlan, asInstance: boolean): Promise<boolean> {
    if (this.opts.rewriteExisting || !this.dest.hasManifest || !unchanged(plan)) return false
    const { digest } = plan.source
    if (!(await this.dest.hasManifest(digest, asInstance ? digest : undefined, { signal: this.signal }))) return false
    log('%s %s already at the destination: not written again', plan.kind === 'index' ? 'list' : 'manifest', digest)
    this.present.push(digest)
    return true
  }

  async writeImage(plan: ImagePlan, asInstance: boolean): Promise<Written> {
    if (await this.alreadyPresent(plan, asInstance)) return sourceAsWritten(plan)
    const outcomes = await this.copyBlobs(plan)
    const written = this.buildManifest(plan, outcomes)
    if (written.changed && plan.constraint) {
      refuse(plan.constraint, plan.instance ?? this.name, ['the layers as copied differ from the manifest'])
    }
    const instance = asInstance ? written.digest : undefined
    this.signal.throwIfAborted()
    await this.dest.putManifest(written.bytes, instance, { signal: this.signal })
    if (plan.sigs.length > 0) await this.dest.putSignatures!(plan.sigs, instance, { signal: this.signal })
    log('manifest %s written%s', written.digest, written.changed ? ` (was ${plan.source.digest})` : '')
    return written
  }

  buildManifest(plan: ImagePlan, outcomes: BlobOutcome[]): Written {
    const src = plan.source.manifest
    const converted = plan.format !== manifestFormatOf(plan.source.mediaType)
    // The media type of every known layer is recomputed below from the bytes as written
    // (layerMediaTypeOut), so convert with those types neutralised: converting the source's
    // `tar+zstd` layers to Docker schema 2 threw UNSUPPORTED even when they were being
    // decompressed (an OCI zstd image into docker-archive:, which desires decompression).
    const neutral = (d: Descriptor, i: number): Descriptor =>
      plan.layers[i].known && isKnownLayerMediaType(d.mediaType) ? { ...d, mediaType: layerMediaType(d.mediaType, null) } : d
    const toConvert: ImageManifest = converted ? { ...src, layers: src.layers.map(neutral) } : src
    const out: ImageManifest = converted ? convertManifest(toConvert, plan.format) : structuredClone(src)
    let changed = converted
    plan.layers.forEach((l, i) => {
      const o = outcomes[i]
      const next: Descriptor = { ...out.layers[i], digest: o.digest, size: o.size, mediaType: this.layerMediaTypeOut(plan, l, o, out.layers[i].mediaType, converted) }
      if (o.digest !== l.original.digest) {
        delete next.urls
        if (l.substituted && l.info.annotations && plan.format === 'oci') next.annotations = { ...l.info.annotations }
        if (next.annotations) {
          next.annotations = { ...next.annotations }
          for (const a of CHUNKED_ANNOTATIONS) delete next.annotations[a]
          if (Object.keys(next.annotations).length === 0) delete next.annotations
        }
      }
      if (JSON.stringify(next) !== JSON.stringify(out.layers[i])) changed = true
      out.layers[i] = next
    })
    if (!changed) return { bytes: plan.source.bytes, digest: plan.source.digest, mediaType: plan.source.mediaType, changed: false }
    const bytes = serializeManifest(out)
    return { bytes, digest: digestOf(bytes), mediaType: converted ? manifestMediaTypeFor(plan.format) : plan.source.mediaType, changed }
  }

  /** The media type of a layer as written: it MUST describe the bytes (known layer types only). */
  layerMediaTypeOut(plan: ImagePlan, l: LayerEntry, o: BlobOutcome, current: string, converted: boolean): string {
    const base = l.info.mediaType ?? l.original.mediaType
    if (!l.known) return current
    const mayCorrect = !plan.constraint && (l.substituted || o.transformed || this.op !== 'preserve')
    let alg = mayCorrect && o.compression !== undefined ? o.compression : l.declared
    if (alg === 'bzip2' || alg === 'xz' || alg === undefined) alg = layerCompressionOf(base) ?? null
    if (alg !== layerCompressionOf(base)) log('layer %s: %s bytes, media type %s', o.digest, alg ?? 'uncompressed', base)
    if (!converted && !l.substituted && alg === layerCompressionOf(base)) return current
    return layerMediaType(base, alg as CompressionAlgorithm | null, plan.format)
  }

  async writeIndex(plan: IndexPlan, top: boolean): Promise<Written> {
    if (await this.alreadyPresent(plan, !top)) return sourceAsWritten(plan)
    const results: { digest: Digest; size: number; mediaType: string }[] = []
    for (const child of plan.children) {
      this.signal.throwIfAborted()
      if (child.kind === 'opaque') {
        await this.dest.putManifest(child.bytes, child.descriptor.digest, { signal: this.signal })
        results.push(child.descriptor)
        continue
      }
      const w = child.kind === 'image' ? await this.writeImage(child, true) : await this.writeIndex(child, false)
      results.push({ digest: w.digest, size: w.bytes.length, mediaType: w.mediaType })
    }
    const src = plan.source.index
    const converted = plan.format !== manifestFormatOf(plan.source.mediaType)
    const out: ImageIndex = converted ? convertIndex(src, plan.format) : structuredClone(src)
    let changed = converted
    out.manifests = out.manifests.map((d, i) => {
      const r = results[i]
      if (d.digest === r.digest && d.size === r.size && d.mediaType === r.mediaType) return d
      changed = true
      return { ...d, digest: r.digest, size: r.size, mediaType: r.mediaType }
    })
    let written: Written = { bytes: plan.source.bytes, digest: plan.source.digest, mediaType: plan.source.mediaType, changed: false }
    if (changed) {
      const bytes = serializeManifest(out)
      written = { bytes, digest: digestOf(bytes), mediaType: converted ? manifestMediaTypeFor(plan.format, true) : plan.source.mediaType, changed }
      if (plan.constraint) refuse(plan.constraint, plan.instance ?? this.name, ['the list would change'])
    }
    const instance = top ? undefined : written.digest
    await this.dest.putManifest(written.bytes, instance, { signal: this.signal })
    if (plan.sigs.length > 0) await this.dest.putSignatures!(plan.sigs, instance, { signal: this.signal })
    log('list %s written with %d entries%s', written.digest, results.length, changed ? ` (was ${plan.source.digest})` : '')
    return written
  }
}

/**
 * Whether copyImage will probably ask the destination for its manifest (hasManifest): it can, and
 * no option asks for a change of format or compression. Only a hint, for warmUp.
 */
function mayFindManifest(dest: ImageDestination, opts: CopyOptions): boolean {
  if (!dest.hasManifest || opts.rewriteExisting || opts.manifestFormat) return false
  return opts.compression === undefined && opts.compressionAlgorithm === undefined
}

/**
 * Whether the copy would write the source's manifest unchanged, blobs aside: the same format, no
 * layer substituted or given a compression step, no signatures to store; for a list, the same of
 * every entry. Reused blobs (all of them, when the manifest is present) keep their digests.
 */
function unchanged(plan: ImagePlan | IndexPlan | OpaquePlan): boolean {
  if (plan.kind === 'opaque') return true
  if (plan.sigs.length > 0 || plan.format !== manifestFormatOf(plan.source.mediaType)) return false
  if (plan.kind === 'index') return plan.children.every(unchanged)
  return plan.layers.every((l) => !l.substituted && l.planned === undefined)
}

function sourceAsWritten(plan: ImagePlan | IndexPlan): Written {
  return { bytes: plan.source.bytes, digest: plan.source.digest, mediaType: plan.source.mediaType, changed: false }
}

/** The compression a layer's info declares: from a substitute's operation, else from its media type. */
function declaredCompression(info: BlobInfo, mediaType: string): DetectedAlgorithm | null | undefined {
  if (info.compressionOperation === 'decompress') return null
  if (info.compressionOperation === 'compress') return info.compressionAlgorithm ?? layerCompressionOf(mediaType) ?? 'gzip'
  return layerCompressionOf(mediaType)
}

function accepts(supported: string[] | undefined, mediaType: string): boolean {
  return supported === undefined || supported.includes(mediaType)
}

/**
 * The manifest format to write: the forced one (which the destination MUST accept), else the
 * source's if the destination accepts it, else the destination's first preference.
 */
function chooseFormat(sourceType: string, supported: string[] | undefined, forced: ManifestFormat | undefined, index: boolean): ManifestFormat {
  const kind = index ? 'list' : 'manifest'
  if (forced) {
    if (!accepts(supported, manifestMediaTypeFor(forced, index))) {
      throw new ImageError('UNSUPPORTED', `the destination does not accept ${forced} ${kind}s (it accepts ${supported!.join(', ')})`)
    }
    return forced
  }
  if (accepts(supported, sourceType)) return manifestFormatOf(sourceType)
  const candidates = supported!.filter(index ? isIndexMediaType : isImageManifestMediaType)
  if (candidates.length === 0) {
    throw new ImageError('UNSUPPORTED', `the destination accepts no ${kind} type blobcache can write (it accepts ${supported!.join(', ') || 'none'})`)
  }
  return manifestFormatOf(candidates[0])
}

/** True when a v2s2 manifest could not describe the layers as they will be written (zstd). */
function needsOci(plan: ImagePlan): boolean {
  const sourceIsDocker = manifestFormatOf(plan.source.mediaType) === 'v2s2'
  return plan.layers.some((l) => {
    const out = l.planned ? (l.planned.compress ?? null) : l.declared
    return l.known && out === 'zstd' && (l.substituted || l.planned !== undefined || !sourceIsDocker)
  })
}

function anyNeedsOci(plan: IndexPlan): boolean {
  return plan.children.some((c) => (c.kind === 'image' ? needsOci(c) : c.kind === 'index' ? anyNeedsOci(c) : false))
}

function describeStep(step: CompressionStep): string {
  if (step.decompress && step.compress) return `recompressed from ${step.decompress} to ${step.compress}`
  return step.compress ? `compressed with ${step.compress}` : `decompressed from ${step.decompress}`
}

function refuse(constraint: Constraint, what: string, changes: string[]): never {
  throw new ImageError(constraint.code, `cannot copy ${what} without changing its manifest digest (${constraint.why}): ${changes.join('; ')}`)
}
