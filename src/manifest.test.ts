import { describe, expect, it } from 'vitest'
import { type Digest, digestOf } from './digest.js'
import {
  type Descriptor,
  type ImageIndex,
  type ImageManifest,
  type Platform,
  MAX_MANIFEST_SIZE,
  choosePlatform,
  convertIndex,
  convertManifest,
  formatPlatform,
  layerCompressionOf,
  layerMediaType,
  manifestDigest,
  manifestFormatOf,
  manifestMediaTypeFor,
  normalizePlatform,
  parseManifest,
  parsePlatform,
  serializeManifest,
} from './manifest.js'
import { MediaType } from './media-types.js'

const d = (mediaType: string, seed: string, size = seed.length, extra: Partial<Descriptor> = {}): Descriptor => ({
  mediaType,
  digest: digestOf(seed),
  size,
  ...extra,
})

function ociManifest(extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    schemaVersion: 2,
    mediaType: MediaType.ociManifest,
    config: d(MediaType.ociConfig, 'config'),
    layers: [d(MediaType.ociLayerGzip, 'layer1', 100), d(MediaType.ociLayer, 'layer2', 200)],
    annotations: { 'org.opencontainers.image.created': '2024-01-01T00:00:00Z' },
    ...extra,
  }
}

function dockerManifest(extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    schemaVersion: 2,
    mediaType: MediaType.dockerManifest,
    config: d(MediaType.dockerConfig, 'config'),
    layers: [d(MediaType.dockerLayerGzip, 'layer1', 100), d(MediaType.dockerForeignLayerGzip, 'win', 300, { urls: ['https://example.com/l'] })],
    ...extra,
  }
}

const entry = (platform: Platform | undefined, seed: string, extra: Partial<Descriptor> = {}): Descriptor =>
  d(MediaType.ociManifest, seed, 500, platform ? { platform, ...extra } : extra)

function index(manifests: Descriptor[], mediaType: string = MediaType.ociIndex): ImageIndex {
  return { schemaVersion: 2, mediaType, manifests }
}

const bytes = (v: unknown) => Buffer.from(JSON.stringify(v))

describe('parseManifest: valid input', () => {
  it('parses an OCI manifest', () => {
    const p = parseManifest(bytes(ociManifest()))
    expect(p.kind).toBe('image')
    expect(p.mediaType).toBe(MediaType.ociManifest)
    if (p.kind === 'image') expect(p.manifest.layers.map((l) => l.size)).toEqual([100, 200])
  })

  it('parses an OCI manifest without mediaType, with the type given by the transport', () => {
    const { mediaType: _m, ...body } = ociManifest()
    expect(parseManifest(bytes(body)).mediaType).toBe(MediaType.ociManifest)
    expect(parseManifest(bytes(body), MediaType.ociManifest).kind).toBe('image')
  })

  it('parses a Docker schema 2 manifest, also when served as application/json', () => {
    const p = parseManifest(bytes(dockerManifest()), 'application/json')
    expect(p).toMatchObject({ kind: 'image', mediaType: MediaType.dockerManifest })
  })

  it('parses an OCI index and a Docker manifest list', () => {
    const oci = parseManifest(bytes(index([entry({ os: 'linux', architecture: 'amd64' }, 'a')])))
    expect(oci).toMatchObject({ kind: 'index', mediaType: MediaType.ociIndex })
    const list = index([d(MediaType.dockerManifest, 'a', 10, { platform: { os: 'linux', architecture: 'arm64', variant: 'v8' } })], MediaType.dockerManifestList)
    const docker = parseManifest(bytes(list), MediaType.dockerManifestList)
    expect(docker).toMatchObject({ kind: 'index', mediaType: MediaType.dockerManifestList })
    if (docker.kind === 'index') expect(docker.index.manifests[0].platform?.variant).toBe('v8')
  })

  it('parses an empty index and a manifest without layers', () => {
    expect(parseManifest(bytes(index([]))).kind).toBe('index')
    expect(parseManifest(bytes(ociManifest({ layers: [] }))).kind).toBe('image')
  })

  it('parses an artifact with subject and artifactType', () => {
    const m = ociManifest({ artifactType: 'application/vnd.example', config: d(MediaType.ociEmpty, '{}'), subject: d(MediaType.ociManifest, 's', 5) })
    expect(parseManifest(bytes(m)).kind).toBe('image')
  })

  it('accepts a manifest of exactly the size limit', () => {
    const base = bytes(ociManifest({ annotations: { pad: '' } }))
    const pad = 'x'.repeat(MAX_MANIFEST_SIZE - base.length)
    const b = bytes(ociManifest({ annotations: { pad } }))
    expect(b.length).toBe(MAX_MANIFEST_SIZE)
    expect(parseManifest(b).kind).toBe('image')
  })
})

describe('parseManifest: invalid input', () => {
  const cases: [string, Buffer, string?][] = [
    ['bad JSON', Buffer.from('{"schemaVersion": 2,'), MediaType.ociManifest],
    ['a JSON array', bytes([ociManifest()])],
    ['a JSON null', bytes(null)],
    ['schemaVersion 3', bytes(ociManifest({ schemaVersion: 3 }))],
    ['schemaVersion "2"', bytes(ociManifest({ schemaVersion: '2' }))],
    ['no schemaVersion', bytes(ociManifest({ schemaVersion: undefined }))],
    ['a bad config digest', bytes(ociManifest({ config: { ...d(MediaType.ociConfig, 'c'), digest: 'sha256:../../etc/passwd' } }))],
    ['an uppercase layer digest', bytes(ociManifest({ layers: [{ ...d(MediaType.ociLayer, 'l'), digest: digestOf('l').toUpperCase() }] }))],
    ['an unknown digest algorithm', bytes(ociManifest({ layers: [{ ...d(MediaType.ociLayer, 'l'), digest: `sha384:${'a'.repeat(96)}` }] }))],
    ['a bad index entry digest', bytes(index([{ ...entry(undefined, 'x'), digest: 'sha256:abc' as Digest }]))],
    ['a negative size', bytes(ociManifest({ layers: [d(MediaType.ociLayer, 'l', -1)] }))],
    ['a fractional size', bytes(ociManifest({ layers: [d(MediaType.ociLayer, 'l', 1.5)] }))],
    ['an absurd size', bytes(ociManifest({ layers: [d(MediaType.ociLayer, 'l', 1e300)] }))],
    ['a size past 2^53', bytes(ociManifest({ config: d(MediaType.ociConfig, 'c', 2 ** 53) }))],
    ['a string size', bytes(ociManifest({ layers: [{ ...d(MediaType.ociLayer, 'l'), size: '5' }] }))],
    ['a missing size', bytes(ociManifest({ layers: [{ mediaType: MediaType.ociLayer, digest: digestOf('l') }] }))],
    ['a missing layer mediaType', bytes(ociManifest({ layers: [{ digest: digestOf('l'), size: 1 }] }))],
    ['layers that are not an array', bytes(ociManifest({ layers: {} }))],
    ['a missing config', bytes(ociManifest({ config: undefined }))],
    ['non-string annotations', bytes(ociManifest({ annotations: { a: 1 } }))],
    ['non-string urls', bytes(ociManifest({ layers: [d(MediaType.ociLayer, 'l', 1, { urls: [1 as never] })] }))],
    ['a platform without os', bytes(index([entry({ architecture: 'amd64' } as Platform, 'a')]))],
    ['a bad subject', bytes(ociManifest({ subject: { mediaType: MediaType.ociManifest, digest: 'x', size: 1 } }))],
    ['an index with layers', bytes({ ...index([]), layers: [] })],
    ['an image manifest with manifests', bytes(ociManifest({ manifests: [] }))],
    ['an index without manifests', bytes({ schemaVersion: 2, mediaType: MediaType.ociIndex })],
    ['a body type contradicting the transport', bytes(ociManifest()), MediaType.dockerManifest],
    ['a Docker body served as an OCI index', bytes(dockerManifest()), MediaType.ociIndex],
    ['an OCI index body served as a Docker list', bytes(index([])), MediaType.dockerManifestList],
    ['a manifest shape served as an index', bytes(ociManifest({ mediaType: undefined })), MediaType.ociIndex],
    ['a non-string mediaType', bytes(ociManifest({ mediaType: 5 })), MediaType.ociManifest],
    ['more than 4 MiB', bytes(ociManifest({ annotations: { pad: 'x'.repeat(MAX_MANIFEST_SIZE) } }))],
  ]

  it.each(cases)('rejects %s with MANIFEST_INVALID', (_what, b, mediaType) => {
    expect(() => parseManifest(b, mediaType)).toThrow(expect.objectContaining({ code: 'MANIFEST_INVALID' }))
  })

  it('rejects Docker schema 1 with UNSUPPORTED', () => {
    const v1 = { schemaVersion: 1, name: 'library/alpine', tag: 'latest', architecture: 'amd64', fsLayers: [], history: [] }
    expect(() => parseManifest(bytes(v1))).toThrow(expect.objectContaining({ code: 'UNSUPPORTED' }))
    expect(() => parseManifest(bytes(v1), MediaType.dockerSchema1Signed)).toThrow(expect.objectContaining({ code: 'UNSUPPORTED' }))
  })

  it('rejects an unknown manifest type with UNSUPPORTED', () => {
    expect(() => parseManifest(bytes({ schemaVersion: 2, mediaType: 'application/x-other' }))).toThrow(
      expect.objectContaining({ code: 'UNSUPPORTED' }),
    )
  })

  it('keeps the digest error as the cause', () => {
    const b = bytes(ociManifest({ config: { ...d(MediaType.ociConfig, 'c'), digest: 'sha256:../../x' } }))
    expect(() => parseManifest(b)).toThrow(expect.objectContaining({ cause: expect.objectContaining({ code: 'DIGEST_INVALID' }) }))
  })
})

describe('platforms', () => {
  const amd64 = entry({ os: 'linux', architecture: 'amd64' }, 'amd64')
  const arm64v8 = entry({ os: 'linux', architecture: 'arm64', variant: 'v8' }, 'arm64v8')
  const arm64 = entry({ os: 'linux', architecture: 'arm64' }, 'arm64')
  const armv6 = entry({ os: 'linux', architecture: 'arm', variant: 'v6' }, 'armv6')
  const armv7 = entry({ os: 'linux', architecture: 'arm', variant: 'v7' }, 'armv7')
  const s390x = entry({ os: 'linux', architecture: 's390x' }, 's390x')
  const attestation = entry({ os: 'unknown', architecture: 'unknown' }, 'att', {
    annotations: { 'vnd.docker.reference.type': 'attestation-manifest', 'vnd.docker.reference.digest': digestOf('amd64') },
  })

  it('chooses amd64', () => {
    expect(choosePlatform(index([attestation, arm64v8, amd64]), { os: 'linux', architecture: 'amd64' })).toBe(amd64)
    expect(choosePlatform(index([amd64]), { os: 'linux', architecture: 'x86_64' })).toBe(amd64)
  })

  it('treats arm64 and arm64/v8 as the same, both ways', () => {
    expect(choosePlatform(index([amd64, arm64v8]), { os: 'linux', architecture: 'arm64' })).toBe(arm64v8)
    expect(choosePlatform(index([amd64, arm64]), { os: 'linux', architecture: 'arm64', variant: 'v8' })).toBe(arm64)
    expect(choosePlatform(index([arm64]), { os: 'linux', architecture: 'aarch64' })).toBe(arm64)
  })

  it('falls back from arm/v7 to arm/v6 but prefers v7', () => {
    expect(choosePlatform(index([amd64, armv6]), { os: 'linux', architecture: 'arm', variant: 'v7' })).toBe(armv6)
    expect(choosePlatform(index([armv6, armv7]), { os: 'linux', architecture: 'arm', variant: 'v7' })).toBe(armv7)
    expect(choosePlatform(index([armv6, armv7]), { os: 'linux', architecture: 'arm' })).toBe(armv7)
  })

  it('never chooses a newer arm variant than asked', () => {
    expect(() => choosePlatform(index([armv7]), { os: 'linux', architecture: 'arm', variant: 'v6' })).toThrow(
      expect.objectContaining({ code: 'PLATFORM_UNKNOWN' }),
    )
  })

  it('fails with PLATFORM_UNKNOWN listing the platforms offered, without attestations', () => {
    let err: Error | undefined
    try {
      choosePlatform(index([amd64, arm64v8, attestation]), { os: 'linux', architecture: 's390x' })
    } catch (e) {
      err = e as Error
    }
    expect(err).toMatchObject({ code: 'PLATFORM_UNKNOWN' })
    expect(err!.message).toContain('linux/s390x')
    expect(err!.message).toContain('linux/amd64')
    expect(err!.message).toContain('linux/arm64/v8')
    expect(err!.message).not.toContain('unknown/unknown')
  })

  it('skips attestation entries even if they claim a real platform', () => {
    const fake = entry({ os: 'linux', architecture: 's390x' }, 'fake', { annotations: { 'vnd.docker.reference.type': 'attestation-manifest' } })
    expect(() => choosePlatform(index([fake]), { os: 'linux', architecture: 's390x' })).toThrow(
      expect.objectContaining({ code: 'PLATFORM_UNKNOWN' }),
    )
    expect(choosePlatform(index([fake, s390x]), { os: 'linux', architecture: 's390x' })).toBe(s390x)
  })

  it('requires the os to match', () => {
    const win = entry({ os: 'windows', architecture: 'amd64', 'os.version': '10.0.17763.1' }, 'win')
    expect(choosePlatform(index([win, amd64]), { os: 'linux', architecture: 'amd64' })).toBe(amd64)
    expect(choosePlatform(index([amd64, win]), { os: 'windows', architecture: 'amd64' })).toBe(win)
  })

  it('defaults to the running platform', () => {
    const all = index([amd64, arm64, armv7, s390x, entry({ os: 'linux', architecture: 'ppc64le' }, 'ppc')])
    if (process.platform === 'linux' && ['x64', 'arm64', 's390x', 'ppc64'].includes(process.arch)) {
      expect(choosePlatform(all).platform?.os).toBe('linux')
    }
  })

  it('parses, formats and normalises platform strings', () => {
    expect(parsePlatform('linux/arm64/v8')).toEqual({ os: 'linux', architecture: 'arm64', variant: 'v8' })
    expect(parsePlatform('linux/amd64')).toEqual({ os: 'linux', architecture: 'amd64' })
    expect(() => parsePlatform('linux')).toThrow(expect.objectContaining({ code: 'PLATFORM_UNKNOWN' }))
    expect(() => parsePlatform('linux/amd64/v1/x')).toThrow(expect.objectContaining({ code: 'PLATFORM_UNKNOWN' }))
    expect(() => parsePlatform('linux//v7')).toThrow(expect.objectContaining({ code: 'PLATFORM_UNKNOWN' }))
    expect(formatPlatform({ os: 'linux', architecture: 'arm', variant: 'v7' })).toBe('linux/arm/v7')
    expect(normalizePlatform({ os: 'Linux', architecture: 'armhf' })).toEqual({ os: 'linux', architecture: 'arm', variant: 'v7' })
    expect(normalizePlatform({ os: 'linux', architecture: 'armel' })).toEqual({ os: 'linux', architecture: 'arm', variant: 'v6' })
    expect(normalizePlatform({ os: 'linux', architecture: 'arm64', variant: 'v8' })).toEqual({ os: 'linux', architecture: 'arm64' })
    expect(normalizePlatform({ os: 'linux', architecture: 'amd64', variant: 'v1' })).toEqual({ os: 'linux', architecture: 'amd64' })
  })
})

describe('layerMediaType', () => {
  it.each([
    [MediaType.ociLayerGzip, null, undefined, MediaType.ociLayer],
    [MediaType.ociLayer, 'gzip', undefined, MediaType.ociLayerGzip],
    [MediaType.ociLayer, 'zstd', undefined, MediaType.ociLayerZstd],
    [MediaType.ociLayerZstd, 'gzip', undefined, MediaType.ociLayerGzip],
    [MediaType.ociLayerGzip, 'gzip', 'oci', MediaType.ociLayerGzip],
    [MediaType.ociLayerGzip, 'gzip', 'v2s2', MediaType.dockerLayerGzip],
    [MediaType.ociLayer, null, 'v2s2', MediaType.dockerLayer],
    [MediaType.dockerLayerGzip, null, undefined, MediaType.dockerLayer],
    [MediaType.dockerLayer, 'gzip', undefined, MediaType.dockerLayerGzip],
    [MediaType.dockerLayer, 'gzip', 'oci', MediaType.ociLayerGzip],
    [MediaType.dockerLayerGzip, 'zstd', 'oci', MediaType.ociLayerZstd],
    [MediaType.ociLayerNondistributable, 'gzip', undefined, MediaType.ociLayerNondistributableGzip],
    [MediaType.ociLayerNondistributableGzip, 'zstd', undefined, MediaType.ociLayerNondistributableZstd],
    [MediaType.ociLayerNondistributableGzip, 'gzip', 'v2s2', MediaType.dockerForeignLayerGzip],
    [MediaType.ociLayerNondistributableGzip, null, 'v2s2', 'application/vnd.docker.image.rootfs.foreign.diff.tar'],
    [MediaType.dockerForeignLayerGzip, 'gzip', 'oci', MediaType.ociLayerNondistributableGzip],
    [MediaType.dockerForeignLayerGzip, null, undefined, 'application/vnd.docker.image.rootfs.foreign.diff.tar'],
    ['application/vnd.example.thing', 'gzip', 'v2s2', 'application/vnd.example.thing'],
  ] as const)('%s + %s (%s) -> %s', (from, alg, format, to) => {
    expect(layerMediaType(from, alg, format)).toBe(to)
  })

  it.each([
    [MediaType.dockerLayer, 'zstd', undefined],
    [MediaType.ociLayerZstd, 'zstd', 'v2s2'],
    [MediaType.ociLayer, 'zstd', 'v2s2'],
    [MediaType.dockerForeignLayerGzip, 'zstd', undefined],
  ] as const)('%s + %s (%s) is UNSUPPORTED', (from, alg, format) => {
    expect(() => layerMediaType(from, alg, format)).toThrow(expect.objectContaining({ code: 'UNSUPPORTED' }))
  })

  it('layerCompressionOf reads the compression from a media type', () => {
    expect(layerCompressionOf(MediaType.ociLayer)).toBeNull()
    expect(layerCompressionOf(MediaType.dockerLayerGzip)).toBe('gzip')
    expect(layerCompressionOf(MediaType.ociLayerNondistributableZstd)).toBe('zstd')
    expect(layerCompressionOf(MediaType.ociConfig)).toBeUndefined()
  })
})

describe('convertManifest', () => {
  const oci = ociManifest() as unknown as ImageManifest
  const docker = dockerManifest() as unknown as ImageManifest

  it('converts OCI to Docker schema 2 keeping digests and sizes', () => {
    const out = convertManifest(oci, 'v2s2')
    expect(out.mediaType).toBe(MediaType.dockerManifest)
    expect(out.config).toEqual({ mediaType: MediaType.dockerConfig, digest: oci.config.digest, size: oci.config.size })
    expect(out.layers.map((l) => [l.mediaType, l.digest, l.size])).toEqual([
      [MediaType.dockerLayerGzip, oci.layers[0].digest, 100],
      [MediaType.dockerLayer, oci.layers[1].digest, 200],
    ])
    expect(out.annotations).toBeUndefined()
    // The result parses as what it claims to be.
    expect(parseManifest(serializeManifest(out))).toMatchObject({ kind: 'image', mediaType: MediaType.dockerManifest })
  })

  it('converts Docker schema 2 to OCI keeping digests, sizes and urls', () => {
    const out = convertManifest(docker, 'oci')
    expect(out.mediaType).toBe(MediaType.ociManifest)
    expect(out.config).toEqual({ mediaType: MediaType.ociConfig, digest: docker.config.digest, size: docker.config.size })
    expect(out.layers).toEqual([
      { mediaType: MediaType.ociLayerGzip, digest: docker.layers[0].digest, size: 100 },
      { mediaType: MediaType.ociLayerNondistributableGzip, digest: docker.layers[1].digest, size: 300, urls: ['https://example.com/l'] },
    ])
    expect(parseManifest(serializeManifest(out))).toMatchObject({ kind: 'image', mediaType: MediaType.ociManifest })
  })

  it('round-trips Docker -> OCI -> Docker', () => {
    expect(convertManifest(convertManifest(docker, 'oci'), 'v2s2')).toEqual(docker)
  })

  it('keeps annotations, subject and artifactType converting OCI to OCI', () => {
    const subject = d(MediaType.ociManifest, 's', 5)
    const m = { ...oci, subject, artifactType: 'application/vnd.example' } as ImageManifest
    const out = convertManifest(m, 'oci')
    expect(out.subject).toEqual(subject)
    expect(out.artifactType).toBe('application/vnd.example')
    expect(out.annotations).toEqual(oci.annotations)
  })

  it('keeps a layer type whose compression it does not know', () => {
    const m = { ...oci, layers: [d('application/vnd.oci.image.layer.v1.tar+xz', 'x', 9)] } as ImageManifest
    expect(convertManifest(m, 'oci').layers[0].mediaType).toBe('application/vnd.oci.image.layer.v1.tar+xz')
  })

  it('refuses zstd layers, artifacts and foreign configs in Docker schema 2 with UNSUPPORTED', () => {
    const zstd = { ...oci, layers: [d(MediaType.ociLayerZstd, 'z', 9)] } as ImageManifest
    expect(() => convertManifest(zstd, 'v2s2')).toThrow(expect.objectContaining({ code: 'UNSUPPORTED' }))
    const artifact = { ...oci, subject: d(MediaType.ociManifest, 's') } as ImageManifest
    expect(() => convertManifest(artifact, 'v2s2')).toThrow(expect.objectContaining({ code: 'UNSUPPORTED' }))
    const helm = { ...oci, config: d('application/vnd.cncf.helm.config.v1+json', 'h') } as ImageManifest
    expect(() => convertManifest(helm, 'v2s2')).toThrow(expect.objectContaining({ code: 'UNSUPPORTED' }))
  })
})

describe('convertIndex and format helpers', () => {
  const ix: ImageIndex = {
    schemaVersion: 2,
    mediaType: MediaType.ociIndex,
    manifests: [
      entry({ os: 'linux', architecture: 'amd64' }, 'a', { annotations: { 'org.opencontainers.image.ref.name': 'x' } }),
      d(MediaType.ociIndex, 'nested', 50),
    ],
    annotations: { k: 'v' },
  }

  it('converts an OCI index to a Docker list and back, keeping digests, sizes and platforms', () => {
    const list = convertIndex(ix, 'v2s2')
    expect(list.mediaType).toBe(MediaType.dockerManifestList)
    expect(list.manifests.map((m) => [m.mediaType, m.digest, m.size, m.platform])).toEqual([
      [MediaType.dockerManifest, ix.manifests[0].digest, 500, { os: 'linux', architecture: 'amd64' }],
      [MediaType.dockerManifestList, ix.manifests[1].digest, 50, undefined],
    ])
    expect(list.manifests[0].annotations).toBeUndefined()
    expect(list.annotations).toBeUndefined()
    const back = convertIndex(list, 'oci')
    expect(back.mediaType).toBe(MediaType.ociIndex)
    expect(back.manifests.map((m) => m.mediaType)).toEqual([MediaType.ociManifest, MediaType.ociIndex])
  })

  it('maps formats and media types', () => {
    expect(manifestFormatOf(MediaType.dockerManifest)).toBe('v2s2')
    expect(manifestFormatOf(MediaType.dockerManifestList)).toBe('v2s2')
    expect(manifestFormatOf(MediaType.ociManifest)).toBe('oci')
    expect(manifestMediaTypeFor('oci')).toBe(MediaType.ociManifest)
    expect(manifestMediaTypeFor('oci', true)).toBe(MediaType.ociIndex)
    expect(manifestMediaTypeFor('v2s2')).toBe(MediaType.dockerManifest)
    expect(manifestMediaTypeFor('v2s2', true)).toBe(MediaType.dockerManifestList)
  })

  it('digests serialized manifests', () => {
    const b = serializeManifest(ociManifest() as unknown as ImageManifest)
    expect(manifestDigest(b)).toBe(digestOf(b))
    expect(JSON.parse(b.toString())).toEqual(ociManifest())
  })
})
