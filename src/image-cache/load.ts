// imageLoad: reads an OCI image tar from a stream (buildkit's `type=oci` output, our own OCI
// export, `docker save` of Docker 25+), storing each blob only after its bytes matched the
// digest that names it, then names the archive's images in one index.json update. Paths may
// carry a `./` prefix; `manifest.json`, `oci-layout` and directories are not needed. A stream
// that ends early or fails leaves no partial blob and index.json as it was.
import { Readable } from 'node:stream'
import debug from 'debug'
import { type Digest, digestFrom } from '../digest.js'
import { ImageError } from '../errors.js'
import { type Descriptor, type ImageIndex, checkDescriptor } from '../manifest.js'
import { isImageManifestMediaType, isIndexMediaType } from '../media-types.js'
import { blobSize, hasBlob, readManifestBlob, writeBlob } from './blobs.js'
import { CONTAINERD_NAME, REF_NAME, storedKey } from './names.js'
import { readTarStream } from './tar-stream.js'

const log = debug('blobcache:image-cache:load')

const BLOB_PATH = /^blobs\/(sha256|sha512)\/([0-9a-f]+)$/
const MAX_INDEX = 16 << 20

/** What an archive's index.json holds, its blobs stored: entries to name, and every entry. */
export interface LoadedArchive {
  /** Every entry of the archive's index.json, named entries with their canonical cache key. */
  descriptors: Descriptor[]
  /** Named entries: cache key -> descriptor to store under it. */
  named: Map<string, Descriptor>
  /** Blobs stored from the archive (new files). */
  stored: number
  /** Blobs the cache already had (left untouched). */
  kept: number
}

const invalid = (msg: string) => new ImageError('ARCHIVE_INVALID', `invalid OCI archive: ${msg}`)

/**
 * Streams an OCI tar into the blobs of `dir` and returns what its index.json names; the caller
 * adds the names to index.json. Blobs already present with the right size are left untouched
 * (same inode, same mtime); every other blob is verified against its name before it is named.
 * Throws `ARCHIVE_INVALID` for a malformed or truncated archive, an archive without index.json,
 * or an index.json naming a manifest the archive and the cache both lack, and `DIGEST_INVALID`
 * for a blob whose bytes do not match its name.
 */
export async function loadArchive(dir: string, stream: Readable | AsyncIterable<Buffer>, opts: { signal?: AbortSignal } = {}): Promise<LoadedArchive> {
  let indexBytes: Buffer | undefined
  let stored = 0
  let kept = 0
  await readTarStream(stream, async (entry, data) => {
    if (entry.unsafe || entry.type !== 'file') return
    if (entry.path === 'index.json') {
      if (entry.size > MAX_INDEX) throw invalid(`index.json is ${entry.size} bytes`)
      const chunks: Buffer[] = []
      for await (const c of data) chunks.push(c)
      indexBytes = Buffer.concat(chunks)
      return
    }
    const m = BLOB_PATH.exec(entry.path)
    if (!m) {
      if (entry.path !== 'manifest.json' && entry.path !== 'oci-layout' && entry.path !== 'repositories') log('ignoring %s', entry.rawPath)
      return
    }
    let digest: Digest
    try {
      digest = digestFrom(m[1], m[2])
    } catch {
      throw invalid(`${entry.rawPath} is not named by a valid digest`)
    }
    if ((await blobSize(dir, digest)) === entry.size) {
      kept++
      return // present and whole: the archive's copy is skipped unread
    }
    await writeBlob(dir, Readable.from(data), { expected: digest, size: entry.size, signal: opts.signal })
    stored++
  }, opts)
  if (!indexBytes) throw invalid('no index.json (an OCI image layout archive is expected)')
  const index = parseArchiveIndex(indexBytes)
  const named = new Map<string, Descriptor>()
  const descriptors: Descriptor[] = []
  for (const d of index.manifests) {
    await checkRoot(dir, d)
    const name = d.annotations?.[CONTAINERD_NAME] ?? d.annotations?.[REF_NAME]
    const key = storedKey(name)
    if (!key) {
      if (name !== undefined) log('entry %s has a name that is not a reference: %s', d.digest, name)
      descriptors.push(d)
      continue
    }
    const { [CONTAINERD_NAME]: _c, [REF_NAME]: _r, ...others } = d.annotations ?? {}
    const entry: Descriptor = { ...d, annotations: { ...others, [REF_NAME]: key } }
    named.set(key, entry)
    descriptors.push(entry)
  }
  log('loaded archive: %d entries (%d named), %d blobs stored, %d kept', descriptors.length, named.size, stored, kept)
  return { descriptors, named, stored, kept }
}

function parseArchiveIndex(bytes: Buffer): ImageIndex {
  let doc: unknown
  try {
    doc = JSON.parse(bytes.toString('utf8'))
  } catch (err) {
    throw new ImageError('ARCHIVE_INVALID', 'invalid OCI archive: index.json is not JSON', { cause: err })
  }
  const m = doc as Record<string, unknown> | null
  if (typeof m !== 'object' || m === null || !Array.isArray(m.manifests)) throw invalid('index.json has no manifests array')
  try {
    m.manifests.forEach((d, i) => checkDescriptor(d, `index.json manifests[${i}]`))
  } catch (err) {
    throw new ImageError('ARCHIVE_INVALID', `invalid OCI archive: ${(err as Error).message}`, { cause: err })
  }
  return m as unknown as ImageIndex
}

/**
 * A root MUST be present and parse; an image root MUST have its config and layers. An index
 * root may lack instances (a cache or `docker save` holds some platforms only).
 */
async function checkRoot(dir: string, d: Descriptor): Promise<void> {
  if (!isImageManifestMediaType(d.mediaType) && !isIndexMediaType(d.mediaType)) {
    throw invalid(`index.json entry ${d.digest} has media type ${d.mediaType}, not a manifest or index`)
  }
  if (!(await hasBlob(dir, d))) throw invalid(`index.json names ${d.digest}, which is neither in the archive nor in the cache`)
  const parsed = await readManifestBlob(dir, d)
  if (parsed.kind === 'index') return
  for (const blob of [parsed.manifest.config, ...parsed.manifest.layers]) {
    if (!(await hasBlob(dir, blob))) throw invalid(`image ${d.digest} needs blob ${blob.digest}, which the archive lacks`)
  }
}

/** Re-checks, under the index lock, that the blobs an archive root needs are still present. */
export async function rootStillPresent(dir: string, d: Descriptor): Promise<boolean> {
  if (!(await hasBlob(dir, d))) return false
  try {
    const parsed = await readManifestBlob(dir, d)
    if (parsed.kind === 'index') return true
    for (const blob of [parsed.manifest.config, ...parsed.manifest.layers]) if (!(await hasBlob(dir, blob))) return false
    return true
  } catch {
    return false
  }
}
