import { describe, expect, it } from 'vitest'
import { type Digest, digestOf } from '../../digest.js'
import {
  ANNOTATION, ARTIFACT_TYPE, BLOB_MEDIA_TYPE, EMPTY_CONFIG, EMPTY_CONFIG_BYTES, type SharedEntry, entryCovers, entryTag,
  formatEntryManifest, mergeEntries, parseEntryManifest,
} from './format.js'

const D = digestOf('the blob')
const U = digestOf('its decompressed form')
const C1 = digestOf('gzip variant')
const C2 = digestOf('zstd variant')

function entry(over: Partial<SharedEntry> = {}): SharedEntry {
  return { digest: D, size: 1234, kind: 'layer', compressed: new Map(), ...over }
}

function manifestWith(patch: (doc: Record<string, any>) => void, digest = D): Buffer {
  const doc = JSON.parse(formatEntryManifest(entry({ digest })).toString()) as Record<string, any>
  patch(doc)
  return Buffer.from(JSON.stringify(doc))
}

describe('entryTag', () => {
  it('names a sha256 digest sha256-<hex>, and refuses sha512 (longer than a tag may be)', () => {
    expect(entryTag(D)).toBe(`sha256-${D.slice(7)}`)
    expect(entryTag(D)!.length).toBe(71)
    expect(entryTag(digestOf('x', 'sha512'))).toBeUndefined()
  })
})

describe('formatEntryManifest', () => {
  it('writes the documented artifact, annotations sorted, byte-identical for equal content', () => {
    const a = entry({ compression: 'gzip', decompressed: U, compressed: new Map([[C2, 'zstd'], [C1, 'gzip']]) })
    const b = entry({ compressed: new Map([[C1, 'gzip'], [C2, 'zstd']]), decompressed: U, compression: 'gzip' })
    const bytes = formatEntryManifest(a)
    expect(formatEntryManifest(b).equals(bytes)).toBe(true)
    const doc = JSON.parse(bytes.toString())
    expect(Object.keys(doc)).toEqual(['schemaVersion', 'mediaType', 'artifactType', 'config', 'layers', 'annotations'])
    expect(doc.mediaType).toBe('application/vnd.oci.image.manifest.v1+json')
    expect(doc.artifactType).toBe(ARTIFACT_TYPE)
    expect(doc.config).toEqual({ ...EMPTY_CONFIG })
    expect(digestOf(EMPTY_CONFIG_BYTES)).toBe(EMPTY_CONFIG.digest)
    expect(Buffer.from(EMPTY_CONFIG.data, 'base64').equals(EMPTY_CONFIG_BYTES)).toBe(true)
    expect(doc.layers).toEqual([{ mediaType: BLOB_MEDIA_TYPE, digest: D, size: 1234 }])
    expect(Object.keys(doc.annotations)).toEqual([ANNOTATION.compressed, ANNOTATION.compression, ANNOTATION.decompressed, ANNOTATION.kind])
    const lines = [`${C1} gzip`, `${C2} zstd`].sort()
    expect(doc.annotations[ANNOTATION.compressed]).toBe(lines.join('\n'))
    expect(doc.annotations[ANNOTATION.decompressed]).toBe(U)
    expect(bytes.toString()).not.toMatch(/\s\s|\n/) // compact: no whitespace between tokens
  })

  it('omits notes that are not known, and refuses an entry it cannot write', () => {
    const doc = JSON.parse(formatEntryManifest(entry({ kind: 'config' })).toString())
    expect(doc.annotations).toEqual({ [ANNOTATION.kind]: 'config' })
    expect(() => formatEntryManifest(entry({ size: -1 }))).toThrow(expect.objectContaining({ code: 'MANIFEST_INVALID' }))
    expect(() => formatEntryManifest(entry({ digest: 'sha256:nope' as Digest }))).toThrow(expect.objectContaining({ code: 'MANIFEST_INVALID' }))
  })
})

describe('parseEntryManifest', () => {
  it('round-trips every note', () => {
    const e = entry({ kind: 'manifest', compression: 'zstd', decompressed: U, compressed: new Map([[C1, 'gzip'], [C2, 'zstd']]) })
    const parsed = parseEntryManifest(formatEntryManifest(e), D)
    expect(parsed).toEqual(e)
    expect(formatEntryManifest(parsed).equals(formatEntryManifest(e))).toBe(true)
  })

  it.each<[string, (doc: Record<string, any>) => void]>([
    ['another artifact type', (d) => (d.artifactType = 'application/vnd.example.thing')],
    ['no artifact type', (d) => delete d.artifactType],
    ['another media type', (d) => (d.mediaType = 'application/vnd.docker.distribution.manifest.v2+json')],
    ['schema version 1', (d) => (d.schemaVersion = 1)],
    ['a layer of another blob', (d) => (d.layers[0].digest = C1)],
    ['a layer of another media type', (d) => (d.layers[0].mediaType = 'application/vnd.oci.image.layer.v1.tar')],
    ['two layers', (d) => d.layers.push({ ...d.layers[0] })],
    ['no layers', (d) => (d.layers = [])],
    ['a negative size', (d) => (d.layers[0].size = -5)],
    ['a fractional size', (d) => (d.layers[0].size = 1.5)],
    ['a size given as a string', (d) => (d.layers[0].size = '1234')],
    ['no kind', (d) => delete d.annotations[ANNOTATION.kind]],
    ['an unknown kind', (d) => (d.annotations[ANNOTATION.kind] = 'index')],
    ['no config', (d) => delete d.config],
  ])('rejects a manifest with %s (MANIFEST_INVALID)', (_what, patch) => {
    expect(() => parseEntryManifest(manifestWith(patch), D)).toThrow(expect.objectContaining({ code: 'MANIFEST_INVALID' }))
  })

  it('rejects what is not JSON, or not an object, or too large', () => {
    for (const bytes of [Buffer.from('not json'), Buffer.from('[1,2]'), Buffer.from('null'), Buffer.alloc(300 << 10, 0x20)]) {
      expect(() => parseEntryManifest(bytes, D)).toThrow(expect.objectContaining({ code: 'MANIFEST_INVALID' }))
    }
  })

  it('drops annotation values that do not hold, keeping the rest', () => {
    const bytes = manifestWith((d) => {
      d.annotations[ANNOTATION.compression] = 'lz4'
      d.annotations[ANNOTATION.decompressed] = '../../etc/passwd'
      d.annotations[ANNOTATION.compressed] = [
        `${C1} gzip`,
        'sha256:1234 gzip', // short hex
        `../${C2} zstd`,
        `${C2}`, // no algorithm
        `${D} gzip`, // itself
        `SHA256:${C2.slice(7)} zstd`,
        `${C2} zstd extra`,
      ].join('\n')
    })
    const e = parseEntryManifest(bytes, D)
    expect(e.compression).toBeUndefined()
    expect(e.decompressed).toBeUndefined()
    expect([...e.compressed]).toEqual([[C1, 'gzip']])
  })

  it('drops a decompressed note naming the blob itself', () => {
    const e = parseEntryManifest(manifestWith((d) => (d.annotations[ANNOTATION.decompressed] = D)), D)
    expect(e.decompressed).toBeUndefined()
  })
})

describe('mergeEntries and entryCovers', () => {
  it('unites compressed variants and keeps existing single values', () => {
    const existing = entry({ kind: 'layer', decompressed: U, compressed: new Map([[C1, 'gzip']]) })
    const other = digestOf('other decompressed')
    const ours = entry({ kind: 'config', compression: 'gzip', decompressed: other, compressed: new Map([[C2, 'zstd'], [C1, 'zstd']]) })
    const merged = mergeEntries(existing, ours)
    expect(merged.kind).toBe('layer')
    expect(merged.decompressed).toBe(U)
    expect(merged.compression).toBe('gzip')
    expect([...merged.compressed].sort()).toEqual([[C1, 'gzip'], [C2, 'zstd']].sort())
    expect(entryCovers(merged, ours)).toBe(true)
    expect(entryCovers(merged, existing)).toBe(true)
    expect(entryCovers(existing, ours)).toBe(false)
    // the inputs are not changed
    expect(existing.compressed.size).toBe(1)
  })

  it('fills in what the existing entry lacks, and takes our size', () => {
    const merged = mergeEntries(entry({ size: 9 }), entry({ decompressed: U, compression: 'zstd' }))
    expect(merged).toEqual(entry({ decompressed: U, compression: 'zstd' }))
  })

  it('is order-independent for the union of notes from several writers', () => {
    const writers = [C1, C2, digestOf('c3'), digestOf('c4')].map((c, i) => entry({ compressed: new Map([[c, i % 2 ? 'zstd' : 'gzip']]) }))
    const forward = writers.reduce((a, b) => mergeEntries(a, b))
    const backward = [...writers].reverse().reduce((a, b) => mergeEntries(a, b))
    expect(formatEntryManifest(forward).equals(formatEntryManifest(backward))).toBe(true)
    for (const w of writers) expect(entryCovers(forward, w)).toBe(true)
  })

  it('does not cover an entry of another size or digest, and refuses to merge different blobs', () => {
    expect(entryCovers(entry(), entry({ size: 1 }))).toBe(false)
    expect(entryCovers(entry(), entry({ digest: C1 }))).toBe(false)
    expect(entryCovers(entry({ compression: 'gzip' }), entry())).toBe(true)
    expect(() => mergeEntries(entry(), entry({ digest: C1 }))).toThrow(expect.objectContaining({ code: 'MANIFEST_INVALID' }))
  })
})
