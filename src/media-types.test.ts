import { describe, expect, it } from 'vitest'
import { digestOf } from './digest.js'
import { MediaType, guessMediaType, isImageManifestMediaType, isIndexMediaType, isManifestMediaType } from './media-types.js'

const desc = (mediaType: string) => ({ mediaType, digest: digestOf(mediaType), size: 1 })
const json = (v: unknown) => Buffer.from(JSON.stringify(v))

describe('guessMediaType', () => {
  it.each([
    ['an explicit OCI manifest', { schemaVersion: 2, mediaType: MediaType.ociManifest, config: desc(MediaType.ociConfig), layers: [] }, MediaType.ociManifest],
    ['an explicit Docker manifest', { schemaVersion: 2, mediaType: MediaType.dockerManifest, config: desc(MediaType.dockerConfig), layers: [] }, MediaType.dockerManifest],
    ['an explicit Docker list', { schemaVersion: 2, mediaType: MediaType.dockerManifestList, manifests: [] }, MediaType.dockerManifestList],
    ['an OCI manifest without mediaType', { schemaVersion: 2, config: desc(MediaType.ociConfig), layers: [] }, MediaType.ociManifest],
    ['an artifact manifest without mediaType', { schemaVersion: 2, config: desc('application/vnd.example+json'), layers: [] }, MediaType.ociManifest],
    ['a manifest with a Docker config and no mediaType', { schemaVersion: 2, config: desc(MediaType.dockerConfig), layers: [] }, MediaType.dockerManifest],
    ['an index without mediaType', { schemaVersion: 2, manifests: [desc(MediaType.ociManifest)] }, MediaType.ociIndex],
    ['Docker schema 1', { schemaVersion: 1, name: 'x', tag: 'y', fsLayers: [] }, MediaType.dockerSchema1],
    ['signed Docker schema 1', { schemaVersion: 1, name: 'x', signatures: [{}] }, MediaType.dockerSchema1Signed],
    ['an unknown explicit type', { schemaVersion: 2, mediaType: 'application/x-other' }, 'application/x-other'],
    ['an empty mediaType field, shaped as an index', { schemaVersion: 2, mediaType: '', manifests: [] }, MediaType.ociIndex],
  ])('recognises %s', (_what, doc, expected) => {
    expect(guessMediaType(json(doc))).toBe(expected)
    expect(guessMediaType(JSON.stringify(doc))).toBe(expected)
  })

  it.each([
    ['not JSON', Buffer.from('{nope')],
    ['empty input', Buffer.alloc(0)],
    ['a JSON array', json([1, 2])],
    ['a JSON string', json('manifest')],
    ['null', json(null)],
    ['schemaVersion 3', json({ schemaVersion: 3, manifests: [] })],
    ['no schemaVersion', json({ config: desc(MediaType.ociConfig), layers: [] })],
    ['schemaVersion 2 with neither config nor manifests', json({ schemaVersion: 2, layers: [] })],
    ['a config that is not an object', json({ schemaVersion: 2, config: 'x' })],
  ])('returns an empty string for %s', (_what, bytes) => {
    expect(guessMediaType(bytes)).toBe('')
  })
})

describe('media type predicates', () => {
  it('classify indexes and image manifests', () => {
    expect(isIndexMediaType(MediaType.ociIndex)).toBe(true)
    expect(isIndexMediaType(MediaType.dockerManifestList)).toBe(true)
    expect(isIndexMediaType(MediaType.ociManifest)).toBe(false)
    expect(isIndexMediaType(undefined)).toBe(false)
    expect(isImageManifestMediaType(MediaType.ociManifest)).toBe(true)
    expect(isImageManifestMediaType(MediaType.dockerManifest)).toBe(true)
    expect(isImageManifestMediaType(MediaType.dockerSchema1)).toBe(false)
    expect(isManifestMediaType(MediaType.dockerManifestList)).toBe(true)
    expect(isManifestMediaType(MediaType.ociLayerGzip)).toBe(false)
  })
})
