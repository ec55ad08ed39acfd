// Property-based tests (fast-check) of the parsers every hostile byte goes through first:
// references, image names, digests, platforms and manifests. Each either answers correctly
// (round trips hold) or throws an ImageError with its documented code; nothing else escapes.
// The run's seed is printed with the figures; BLOBCACHE_RELIABILITY_SEED replays it.
import fc from 'fast-check'
import { describe, expect, it } from 'vitest'
import { type Digest, digestHex, digestOf, isDigest, parseDigest } from '../../src/digest.js'
import { type ErrorCode, isImageError } from '../../src/errors.js'
import {
  type Descriptor, type ImageIndex, type ImageManifest, choosePlatform, convertIndex, convertManifest, formatPlatform,
  manifestDigest, parseManifest, parsePlatform, serializeManifest,
} from '../../src/manifest.js'
import { MediaType } from '../../src/media-types.js'
import { parseNamed, parseNormalizedNamed, withDefaultTag } from '../../src/name.js'
import { imageName, parseImageName } from '../../src/transports/index.js'
import { knob, recordFigures, runSeed } from '../helpers/children.js'
import { mutate } from '../helpers/reliability-fixtures.js'

const RUNS = knob('property_runs', 400)
const seed = runSeed()
const params = { numRuns: RUNS, seed }
const figures: Record<string, number> = {}
const count = (name: string) => (figures[name] = (figures[name] ?? 0) + 1)

/** Runs `fn`; a throw MUST be an ImageError with one of `codes`. Resolves the value or undefined. */
function typed<T>(codes: ErrorCode[], fn: () => T): T | undefined {
  try {
    return fn()
  } catch (err) {
    if (!isImageError(err) || !codes.includes(err.code)) throw new Error(`expected an ImageError ${codes.join('|')}, got ${(err as Error)?.stack ?? String(err)}`)
    return undefined
  }
}

// ---- generators ------------------------------------------------------------------------------

const hex = (n: number) => fc.string({ unit: fc.constantFrom(...'0123456789abcdef'), minLength: n, maxLength: n })
const digestArb: fc.Arbitrary<Digest> = fc.oneof(hex(64).map((h) => `sha256:${h}`), hex(128).map((h) => `sha512:${h}`)) as fc.Arbitrary<Digest>
const lower = fc.string({ unit: fc.constantFrom(...'abcdefghijklmnopqrstuvwxyz0123456789'), minLength: 1, maxLength: 8 })
const component = fc.tuple(lower, fc.array(fc.tuple(fc.constantFrom('.', '_', '__', '-', '--'), lower), { maxLength: 2 }))
  .map(([a, rest]) => a + rest.map(([s, b]) => s + b).join(''))
const pathArb = fc.array(component, { minLength: 1, maxLength: 4 }).map((c) => c.join('/'))
const domainArb = fc.oneof(
  fc.constant('localhost'),
  fc.tuple(lower, fc.constantFrom('.io', '.example.com', '.local')).map(([a, b]) => a + b),
  fc.tuple(fc.constantFrom('localhost', 'registry.test', '127.0.0.1', '[::1]'), fc.integer({ min: 1, max: 65535 })).map(([h, p]) => `${h}:${p}`),
)
const tagArb = fc.tuple(fc.constantFrom(...'abcXYZ019_'), fc.string({ unit: fc.constantFrom(...'abcXYZ019_.-'), maxLength: 20 })).map(([a, b]) => a + b)
/** Pieces that break references: separators in the wrong place, traversal, unicode, NULs. */
const nasty = fc.constantFrom('/', '//', ':', '@', '..', '../', '/..', '.', '-', '_', '__', 'A', ' ', '\0', '\n', 'é', '%2e', '\\', '[', ']', '::', 'sha256:', '@sha256:' + 'a'.repeat(64), ':' + 'x'.repeat(129))
const refIsh = fc.array(fc.oneof(lower, nasty, tagArb, digestArb), { minLength: 1, maxLength: 8 }).map((xs) => xs.join(''))

const mediaTypes = [MediaType.ociLayer, MediaType.ociLayerGzip, MediaType.ociLayerZstd, MediaType.dockerLayer, 'application/vnd.example+json']
const descriptorArb = (types: string[]): fc.Arbitrary<Descriptor> =>
  fc.record(
    {
      mediaType: fc.constantFrom(...types),
      digest: digestArb,
      size: fc.nat({ max: Number.MAX_SAFE_INTEGER }),
      annotations: fc.dictionary(fc.string({ minLength: 1, maxLength: 20 }), fc.string({ maxLength: 30 }), { maxKeys: 3 }),
      urls: fc.array(fc.webUrl(), { maxLength: 2 }),
      platform: fc.record({ os: fc.constantFrom('linux', 'windows'), architecture: fc.constantFrom('amd64', 'arm64', 'arm'), variant: fc.constantFrom('v6', 'v7', 'v8') }, { requiredKeys: ['os', 'architecture'] }),
    },
    { requiredKeys: ['mediaType', 'digest', 'size'] },
  ) as fc.Arbitrary<Descriptor>
const manifestArb: fc.Arbitrary<ImageManifest> = fc.record(
  {
    schemaVersion: fc.constant(2 as const),
    mediaType: fc.constant(MediaType.ociManifest),
    config: descriptorArb([MediaType.ociConfig]),
    layers: fc.array(descriptorArb(mediaTypes), { maxLength: 6 }),
    annotations: fc.dictionary(fc.string({ minLength: 1, maxLength: 20 }), fc.string({ maxLength: 30 }), { maxKeys: 3 }),
  },
  { requiredKeys: ['schemaVersion', 'mediaType', 'config', 'layers'] },
)
const indexArb: fc.Arbitrary<ImageIndex> = fc.record(
  {
    schemaVersion: fc.constant(2 as const),
    mediaType: fc.constant(MediaType.ociIndex),
    manifests: fc.array(descriptorArb([MediaType.ociManifest, MediaType.ociIndex, MediaType.dockerManifest]), { maxLength: 6 }),
    annotations: fc.dictionary(fc.string({ minLength: 1, maxLength: 20 }), fc.string({ maxLength: 30 }), { maxKeys: 3 }),
  },
  { requiredKeys: ['schemaVersion', 'mediaType', 'manifests'] },
)

// ---- references ------------------------------------------------------------------------------

describe('references (fast-check)', () => {
  it('parseNormalizedNamed on hostile strings: REFERENCE_INVALID or a canonical reference that round-trips', () => {
    fc.assert(
      fc.property(fc.oneof(refIsh, fc.string({ unit: 'binary', maxLength: 300 })), (s) => {
        count('references')
        const ref = typed(['REFERENCE_INVALID'], () => parseNormalizedNamed(s))
        if (!ref) return
        const canonical = ref.toString()
        expect(parseNamed(canonical).toString()).toBe(canonical)
        expect(parseNormalizedNamed(ref.familiar()).toString()).toBe(canonical)
        expect(ref.name().length).toBeLessThanOrEqual(255)
        expect(ref.path).toBe(ref.path.toLowerCase())
        expect(ref.path.split('/')).not.toContain('..')
        if (ref.digest !== undefined) expect(isDigest(ref.digest)).toBe(true)
        expect(withDefaultTag(ref).toString()).toBe(ref.tag === undefined && ref.digest === undefined ? `${canonical}:latest` : canonical)
      }),
      params,
    )
  })

  it('references built from valid parts parse back to exactly those parts', () => {
    fc.assert(
      fc.property(fc.option(domainArb, { nil: undefined }), pathArb, fc.option(tagArb, { nil: undefined }), fc.option(digestArb, { nil: undefined }), (domain, path, tag, digest) => {
        count('references')
        const s = (domain ? `${domain}/` : '') + path + (tag ? `:${tag}` : '') + (digest ? `@${digest}` : '')
        if (((domain ?? 'docker.io') + '/' + path).length > 240) return
        // docker's rule: without a domain, a first component with a dot (or `localhost`) is one,
        // and then it must be a valid host name (no underscores)
        const first = path.split('/')[0]
        const implied = !domain && path.includes('/') && (first.includes('.') || first === 'localhost')
        if (implied && first.includes('_')) {
          expect(() => parseNormalizedNamed(s)).toThrow(expect.objectContaining({ code: 'REFERENCE_INVALID' }))
          return
        }
        const ref = parseNormalizedNamed(s)
        const wantDomain = domain ?? (implied ? first : 'docker.io')
        const rest = implied ? path.slice(first.length + 1) : path
        expect(ref.domain).toBe(wantDomain)
        expect(ref.path).toBe(wantDomain === 'docker.io' && !rest.includes('/') ? `library/${rest}` : rest)
        expect(ref.tag).toBe(tag)
        expect(ref.digest).toBe(digest)
      }),
      params,
    )
  })

  it('parseImageName on hostile strings: a typed error or a reference whose name round-trips', () => {
    const transports = fc.constantFrom('oci:', 'dir:', 'oci-archive:', 'docker-archive:', 'docker://', 'nosuch:', '', 'docker:')
    fc.assert(
      fc.property(transports, fc.oneof(refIsh, fc.string({ unit: 'binary', maxLength: 200 })), (t, rest) => {
        count('imageNames')
        const ref = typed(['REFERENCE_INVALID', 'TRANSPORT_UNKNOWN'], () => parseImageName(t + rest))
        if (!ref) return
        expect(imageName(parseImageName(imageName(ref)))).toBe(imageName(ref))
      }),
      params,
    )
  })
})

// ---- digests and platforms ---------------------------------------------------------------------

describe('digests and platforms (fast-check)', () => {
  it('parseDigest: DIGEST_INVALID, or the same string with a hex part that is safe in a path', () => {
    fc.assert(
      fc.property(fc.oneof(fc.string({ unit: 'binary', maxLength: 140 }), digestArb.map((d) => d + ''), fc.tuple(digestArb, nasty, fc.nat(140)).map(([d, x, i]) => d.slice(0, i) + x + d.slice(i))), (s) => {
        count('digests')
        const d = typed(['DIGEST_INVALID'], () => parseDigest(s))
        if (d === undefined) {
          expect(isDigest(s)).toBe(false)
          return
        }
        expect(d).toBe(s)
        expect(digestHex(d)).toMatch(/^[0-9a-f]+$/)
      }),
      params,
    )
  })

  it('valid digests always parse, and digestOf agrees with parseDigest', () => {
    fc.assert(
      fc.property(digestArb, fc.uint8Array({ maxLength: 200 }), (d, bytes) => {
        count('digests')
        expect(parseDigest(d)).toBe(d)
        expect(parseDigest(digestOf(Buffer.from(bytes)))).toBe(digestOf(Buffer.from(bytes)))
        expect(() => parseDigest(d.toUpperCase())).toThrow(expect.objectContaining({ code: 'DIGEST_INVALID' }))
      }),
      params,
    )
  })

  it('parsePlatform and choosePlatform: PLATFORM_UNKNOWN or a correct answer', () => {
    fc.assert(
      fc.property(fc.oneof(refIsh, fc.string({ maxLength: 40 })), indexArb, (s, index) => {
        count('platforms')
        const p = typed(['PLATFORM_UNKNOWN'], () => parsePlatform(s))
        if (p) expect(parsePlatform(formatPlatform(p))).toEqual(p)
        const chosen = typed(['PLATFORM_UNKNOWN'], () => choosePlatform(index, p ?? { os: 'linux', architecture: 'amd64' }))
        if (chosen) expect(index.manifests).toContain(chosen)
      }),
      params,
    )
  })
})

// ---- manifests -------------------------------------------------------------------------------

describe('manifests (fast-check)', () => {
  it('image manifests and indexes survive serialize -> parse unchanged, with a stable digest', () => {
    fc.assert(
      fc.property(fc.oneof(manifestArb, indexArb), (m) => {
        count('manifests')
        const bytes = serializeManifest(m)
        const parsed = parseManifest(bytes, m.mediaType)
        expect(parsed.kind).toBe('manifests' in m ? 'index' : 'image')
        expect(parsed.kind === 'index' ? parsed.index : parsed.manifest).toEqual(m)
        expect(parseManifest(bytes).kind).toBe(parsed.kind) // the type is guessed the same way
        expect(serializeManifest(parsed.kind === 'index' ? parsed.index : parsed.manifest).equals(bytes)).toBe(true)
        expect(manifestDigest(bytes)).toBe(digestOf(bytes))
      }),
      params,
    )
  })

  it('OCI -> Docker schema 2 -> OCI keeps digests, sizes and (convertible) media types, or fails UNSUPPORTED', () => {
    fc.assert(
      fc.property(manifestArb, indexArb, (m, ix) => {
        count('manifests')
        const v2 = typed(['UNSUPPORTED'], () => convertManifest(m, 'v2s2'))
        if (v2) {
          const back = convertManifest(v2, 'oci')
          expect(back.layers.map((l) => [l.digest, l.size])).toEqual(m.layers.map((l) => [l.digest, l.size]))
          expect(back.config.digest).toBe(m.config.digest)
          expect(parseManifest(serializeManifest(v2), MediaType.dockerManifest).kind).toBe('image')
        }
        const list = convertIndex(ix, 'v2s2')
        expect(convertIndex(list, 'oci').manifests.map((d) => d.digest)).toEqual(ix.manifests.map((d) => d.digest))
      }),
      params,
    )
  })

  it('mutated manifests, random JSON and random bytes: MANIFEST_INVALID/UNSUPPORTED, or every descriptor valid', () => {
    const mutated = fc.tuple(fc.oneof(manifestArb, indexArb), fc.array(fc.nat(20), { maxLength: 4 }), fc.jsonValue()).map(([m, path, v]) => Buffer.from(JSON.stringify(mutate(m, path, v))))
    fc.assert(
      fc.property(fc.oneof(mutated, fc.jsonValue().map((v) => Buffer.from(JSON.stringify(v) ?? 'null')), fc.uint8Array({ maxLength: 300 }).map((b) => Buffer.from(b))), fc.option(fc.constantFrom(...Object.values(MediaType), 'text/plain', ''), { nil: undefined }), (bytes, type) => {
        count('manifests')
        const parsed = typed(['MANIFEST_INVALID', 'UNSUPPORTED'], () => parseManifest(bytes, type))
        if (!parsed) return
        const descriptors = parsed.kind === 'index' ? parsed.index.manifests : [parsed.manifest.config, ...parsed.manifest.layers]
        for (const d of descriptors) {
          expect(isDigest(d.digest)).toBe(true)
          expect(Number.isSafeInteger(d.size) && d.size >= 0).toBe(true)
        }
      }),
      params,
    )
  })
})

describe('figures', () => {
  it('records the cases tried', () => {
    console.log(JSON.stringify(recordFigures('properties', { seed, runsPerProperty: RUNS, ...figures })))
    expect(Object.keys(figures).length).toBeGreaterThan(0)
  })
})
