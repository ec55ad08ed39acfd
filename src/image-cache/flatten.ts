// Flattens an image's layers into the tar of its final file system, with whiteouts applied
// (what `mutate.Extract` gives linuxkit). Entries come out bottom layer first, so directories
// precede their contents and hard links follow their targets, which extraction needs. A first
// pass reads the headers of every layer but the bottom one to learn what each layer hides:
// the paths it sets, the paths it deletes (`.wh.name`), the directories it makes opaque
// (`.wh..wh..opq`) and the directories it replaces with non-directories. The second pass copies
// each entry that no layer above it hides, header blocks and data unchanged.
import { createReadStream } from 'node:fs'
import { once } from 'node:events'
import { open } from 'node:fs/promises'
import { PassThrough, type Readable, pipeline } from 'node:stream'
import debug from 'debug'
import { decompressStream, detectCompression } from '../compression.js'
import { verifyDigest } from '../digest.js'
import { notFound } from '../errors.js'
import type { DetectedAlgorithm } from '../types.js'
import { type Descriptor, layerCompressionOf } from '../manifest.js'
import { CHUNK, blobPath } from './blobs.js'
import { type StreamEntry, readTarStream } from './tar-stream.js'

const log = debug('blobcache:image-cache:flatten')

const WHITEOUT = '.wh.'
const OPAQUE = '.wh..wh..opq'

/** What the layers above a given layer hide, as the highest layer index that hides it. */
interface Hidden {
  /** Exact paths set or deleted by a layer. */
  exact: Map<string, number>
  /** Paths below which a layer hides everything (deleted, opaque, or replaced by a non-directory). */
  subtree: Map<string, number>
}

const bump = (m: Map<string, number>, path: string, layer: number) => m.set(path, Math.max(m.get(path) ?? -1, layer))

function isHidden(h: Hidden, path: string, layer: number): boolean {
  if ((h.exact.get(path) ?? -1) > layer) return true
  let i = path.indexOf('/')
  while (i >= 0) {
    if ((h.subtree.get(path.slice(0, i)) ?? -1) > layer) return true
    i = path.indexOf('/', i + 1)
  }
  return false
}

/** Splits `dir/.wh.name` into its directory and base name. */
function split(path: string): { dir: string; base: string } {
  const i = path.lastIndexOf('/')
  return i < 0 ? { dir: '', base: path } : { dir: path.slice(0, i), base: path.slice(i + 1) }
}

const join = (dir: string, base: string) => (dir ? `${dir}/${base}` : base)

/** Opens a layer blob as its uncompressed tar, verifying the blob against its digest. */
async function openLayer(dir: string, layer: Descriptor): Promise<Readable> {
  const path = blobPath(dir, layer.digest)
  let alg: DetectedAlgorithm | null | undefined = layerCompressionOf(layer.mediaType)
  if (alg === undefined) {
    // an unknown media type: look at the bytes
    const fh = await open(path, 'r').catch(notFound(`layer ${layer.digest}`))
    try {
      const head = Buffer.alloc(8)
      const { bytesRead } = await fh.read(head, 0, 8, 0)
      alg = detectCompression(head.subarray(0, bytesRead))
    } finally {
      await fh.close()
    }
  }
  const file = createReadStream(path, { highWaterMark: CHUNK })
  const verify = verifyDigest({ expected: layer.digest, size: layer.size })
  const done = (err?: Error | null) => err && log('layer %s: %s', layer.digest, err.message)
  return alg ? pipeline(file, verify, decompressStream(alg), done) : pipeline(file, verify, done)
}

async function learn(dir: string, layers: Descriptor[], signal?: AbortSignal): Promise<Hidden> {
  const hidden: Hidden = { exact: new Map(), subtree: new Map() }
  for (let i = 1; i < layers.length; i++) {
    await readTarStream(await openLayer(dir, layers[i]), async (e) => {
      if (e.unsafe || e.path === '') return
      const { dir: parent, base } = split(e.path)
      if (base === OPAQUE) bump(hidden.subtree, parent, i)
      else if (base.startsWith(WHITEOUT)) {
        const target = join(parent, base.slice(WHITEOUT.length))
        bump(hidden.exact, target, i)
        bump(hidden.subtree, target, i)
      } else {
        bump(hidden.exact, e.path, i)
        if (e.type !== 'dir') bump(hidden.subtree, e.path, i)
      }
    }, { signal })
  }
  return hidden
}

/** Writes to `out`, waiting for it to drain; throws once the reader went away. */
async function put(out: PassThrough, chunk: Buffer): Promise<void> {
  if (out.destroyed) throw new Error('the reader closed the flattened tar')
  if (out.write(chunk)) return
  await Promise.race([once(out, 'drain'), once(out, 'close')])
  if (out.destroyed) throw new Error('the reader closed the flattened tar')
}

async function emit(dir: string, layers: Descriptor[], hidden: Hidden, out: PassThrough, signal?: AbortSignal): Promise<void> {
  let kept = 0
  let dropped = 0
  for (let i = 0; i < layers.length; i++) {
    await readTarStream(await openLayer(dir, layers[i]), async (e: StreamEntry, data) => {
      const base = split(e.path).base
      if (e.unsafe || e.path === '' || base.startsWith(WHITEOUT) || isHidden(hidden, e.path, i)) {
        dropped++
        return
      }
      for (const h of e.headers) await put(out, h)
      for await (const piece of data) await put(out, piece)
      const pad = (512 - (e.size % 512)) % 512
      if (pad) await put(out, Buffer.alloc(pad))
      kept++
    }, { signal })
  }
  await put(out, Buffer.alloc(1024))
  log('flattened %d layers: %d entries kept, %d hidden or dropped', layers.length, kept, dropped)
}

/**
 * The flattened file system of an image whose layers are `layers` (bottom first), as a tar
 * stream. A damaged layer (digest mismatch), a missing blob or a malformed layer errors the
 * stream. Destroying the stream stops the work.
 */
export function flattenLayers(dir: string, layers: Descriptor[], opts: { signal?: AbortSignal } = {}): Readable {
  const out = new PassThrough({ highWaterMark: CHUNK })
  ;(async () => {
    const hidden = await learn(dir, layers, opts.signal)
    await emit(dir, layers, hidden, out, opts.signal)
    out.end()
  })().catch((err: unknown) => {
    if (!out.destroyed) out.destroy(opts.signal?.aborted ? opts.signal.reason : (err as Error))
  })
  return out
}
