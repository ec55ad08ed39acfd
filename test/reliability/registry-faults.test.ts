// Registry faults, generated: fast-check draws schedules of faults (connection resets, 5xx,
// 429 with Retry-After, slow answers, bodies dripped a few KiB at a time, bodies cut short,
// wrong bytes for a digest) on manifests, blobs and uploads, injected by the fault proxy (and
// the drip proxy in front of it) between blobcache and the real registry. Each schedule runs
// one pull or push through a BlobCache shared by every case. Every copy either succeeds with
// the right content (every blob re-hashed, layers decompressed and compared with the written
// diff IDs) or fails with a typed ImageError; a failed pull names nothing; a tag a failed push
// left is whole; and the shared cache never holds a corrupt entry.
import { mkdir, mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import fc from 'fast-check'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { BlobCache } from '../../src/blobcache/index.js'
import { copyImage } from '../../src/copy.js'
import { isImageError } from '../../src/errors.js'
import { MediaType } from '../../src/media-types.js'
import type { RetryPolicy } from '../../src/registry/retry.js'
import { OciLayoutReference } from '../../src/transports/oci-layout.js'
import type { LayerCompression, RegistryOptions } from '../../src/types.js'
import { knob, recordFigures, runSeed } from '../helpers/children.js'
import { type DripProxy, startDripProxy } from '../helpers/drip-proxy.js'
import { type Fault, type FaultProxy, type FaultRule, startFaultProxy } from '../helpers/fault-proxy.js'
import { checkBlobCacheDir, checkLayoutDir, entryNames, imageContent } from '../helpers/invariants.js'
import { peer } from '../helpers/peers.js'
import { type RandomImage, putRandomImage } from '../helpers/random-image.js'
import { type TestRegistry, registryRef, startRegistry } from '../helpers/registry.js'
import { buildImage, writeImageTo } from '../helpers/reliability-fixtures.js'

const CASES = knob('fault_cases', 30)
/** A case taking longer than this has hung. */
const CASE_MS = 45_000
/** Quick retries, so that persistent faults give up within a second or so. */
const FAST: RegistryOptions & { retry: RetryPolicy } = { tlsVerify: false, retry: { attempts: 4, baseDelay: 20, maxDelay: 200 } }
const registryBin = peer('docker-registry')

type Target = 'manifest' | 'blob' | 'upload' | 'any'
type FaultKind = 'reset' | 'status' | 'retry-after' | 'drop' | 'flip' | 'truncate' | 'delay' | 'drip'
interface FaultSpec {
  kind: FaultKind
  target: Target
  /** Matching requests that get the fault; 0 means every one. */
  count: number
  /** The status, the cut-off byte, the delay, or the drip rate, by kind. */
  n: number
}
interface Case {
  /** pull by tag, pull by digest (the manifest is verified), pull one platform of an index, or push. */
  direction: 'pull' | 'pull-digest' | 'pull-index' | 'push'
  mode: LayerCompression
  /** Empty the shared cache first, so that the blobs come from the registry (and its faults). */
  cold: boolean
  faults: FaultSpec[]
}

const PATHS: Record<Target, { path: RegExp; method?: string }[]> = {
  manifest: [{ path: /\/manifests\// }],
  blob: [{ path: /\/blobs\/sha256:/ }],
  upload: [{ path: /\/blobs\/uploads\//, method: 'PATCH' }, { path: /\/blobs\/uploads\//, method: 'PUT' }, { path: /\/blobs\/uploads\/$/, method: 'POST' }],
  any: [{ path: /^\/v2\/.+/ }],
}

const faultArb: fc.Arbitrary<FaultSpec> = fc.record({
  kind: fc.constantFrom<FaultKind>('reset', 'status', 'retry-after', 'drop', 'flip', 'truncate', 'delay', 'drip'),
  target: fc.constantFrom<Target>('manifest', 'blob', 'blob', 'upload', 'any'),
  count: fc.oneof({ weight: 5, arbitrary: fc.integer({ min: 1, max: 3 }) }, { weight: 1, arbitrary: fc.constant(0) }),
  n: fc.integer({ min: 0, max: 1 << 20 }),
})
const caseArb: fc.Arbitrary<Case> = fc.record({
  direction: fc.constantFrom<Case['direction']>('pull', 'pull-digest', 'pull-index', 'push'),
  mode: fc.constantFrom<LayerCompression>('preserve', 'compress', 'decompress'),
  cold: fc.boolean(),
  faults: fc.array(faultArb, { minLength: 1, maxLength: 3 }),
})

function toFault(f: FaultSpec): Fault | undefined {
  switch (f.kind) {
    case 'reset':
      return { kind: 'reset' }
    case 'status':
      return { kind: 'status', status: [500, 502, 503, 504][f.n % 4], body: '{"errors":[{"code":"UNKNOWN","message":"injected"}]}' }
    case 'retry-after':
      return { kind: 'status', status: 429, headers: { 'retry-after': String(f.n % 2) } }
    case 'drop':
      return { kind: 'drop', afterBytes: f.n % 200_000 }
    case 'delay':
      return { kind: 'delay', ms: 20 + (f.n % 250) }
    case 'flip':
      return {
        kind: 'rewrite',
        rewrite: (a) => {
          if (a.status !== 200 || a.body.length === 0) return a
          const body = Buffer.from(a.body)
          body[f.n % body.length] ^= 0x20
          return { ...a, body }
        },
      }
    case 'truncate':
      return { kind: 'rewrite', rewrite: (a) => (a.status === 200 && a.body.length ? { ...a, body: a.body.subarray(0, f.n % a.body.length) } : a) }
    case 'drip':
      return undefined
  }
}

/** Cases that found bugs once, tried on every run before the generated ones. */
const REGRESSIONS: [Case][] = [
  // a manifest body cut after 8 bytes, twice: the cut body was not retried and escaped untyped
  [{ direction: 'pull-index', mode: 'preserve', cold: true, faults: [{ kind: 'drop', target: 'manifest', count: 2, n: 8 }] }],
  [{ direction: 'pull', mode: 'compress', cold: true, faults: [{ kind: 'drop', target: 'manifest', count: 0, n: 100 }] }],
  // every blob cut mid-body three times: resumed with Range
  [{ direction: 'pull-index', mode: 'preserve', cold: true, faults: [{ kind: 'drop', target: 'blob', count: 3, n: 133_963 }] }],
]

describe.skipIf(!registryBin)('generated registry faults', () => {
  let registry: TestRegistry
  let faults: FaultProxy
  let drip: DripProxy
  let root: string
  let cacheDir: string
  let image: RandomImage
  let srcLayout: string

  beforeAll(async () => {
    registry = await startRegistry()
    faults = await startFaultProxy(registry.host)
    drip = await startDripProxy(faults.host)
    root = await mkdtemp(join(tmpdir(), 'blobcache-rel-faults-'))
    cacheDir = join(root, 'cache')
    await mkdir(cacheDir)
    image = await buildImage([
      { seed: 'fault-a', size: 400_000, compression: 'gzip' },
      { seed: 'fault-b', size: 250_000, compression: null },
      { seed: 'fault-c', size: 300_000, compression: 'zstd' },
    ])
    srcLayout = join(root, 'src')
    await writeImageTo(new OciLayoutReference(srcLayout, 'v1'), image)
    await writeImageTo(registryRef(registry.host, 'rel/app:v1'), image)
    // an index of two platforms: its instances are fetched by digest
    const arm = await buildImage([{ seed: 'fault-arm', size: 200_000, compression: 'gzip' }], { os: 'linux', architecture: 'arm64' })
    const index = Buffer.from(JSON.stringify({
      schemaVersion: 2, mediaType: MediaType.ociIndex,
      manifests: [image, arm].map((im) => ({ mediaType: im.mediaType, digest: im.manifestDigest, size: im.manifest.length, platform: im.platform })),
    }))
    const dest = await registryRef(registry.host, 'rel/multi:v1').newImageDestination()
    try {
      for (const im of [image, arm]) await putRandomImage(dest, im, true)
      await dest.putManifest(index)
      await dest.commit()
    } finally {
      await dest.close()
    }
  })
  afterAll(async () => {
    await drip?.close()
    await faults?.close()
    await registry?.stop()
    if (root) await rm(root, { recursive: true, force: true })
  })

  it(`${CASES} generated fault schedules: success with the right content or a typed error, never a corrupt cache`, async () => {
    const seed = runSeed()
    const figures = { seed, cases: 0, succeeded: 0, failed: 0, faultsInjected: 0, codes: {} as Record<string, number>, corrupt: 0, slowestMs: 0 }
    const wantDiffIDs = image.layers.map((l) => l.diffID)
    let n = 0
    await fc.assert(
      fc.asyncProperty(caseArb, async (c) => {
        const id = n++
        const rules: FaultRule[] = []
        for (const f of c.faults) {
          const fault = toFault(f)
          for (const where of PATHS[f.target]) {
            if (fault) rules.push({ ...where, count: f.count || undefined, fault })
          }
        }
        faults.setRules(rules)
        faults.clear()
        const dripping = c.faults.filter((f) => f.kind === 'drip')
        drip.setRules(dripping.flatMap((f) => PATHS[f.target].map((w) => ({ ...w, count: f.count || 2, bytes: 16_384 + (f.n % 65_536), everyMs: 5 }))))
        const drippedBefore = drip.dripped
        const dest = join(root, `dest-${id}`)
        if (c.cold) await new BlobCache(new OciLayoutReference(dest, 'v1'), cacheDir).clearCache()
        let outcome: unknown
        const started = Date.now()
        // a case that hangs is a failure of its own: abort it, and report the case
        const controller = new AbortController()
        const hung = new Error(`case ${id} hung for ${CASE_MS} ms: ${JSON.stringify(c)}`)
        const timer = setTimeout(() => controller.abort(hung), CASE_MS)
        let stuck: NodeJS.Timeout | undefined
        const copy = async () => {
          if (c.direction !== 'push') {
            const name = { pull: 'rel/app:v1', 'pull-digest': `rel/app@${image.manifestDigest}`, 'pull-index': 'rel/multi:v1' }[c.direction]
            const from = new BlobCache(registryRef(drip.host, name, FAST), cacheDir, c.mode)
            await copyImage(from, new BlobCache(new OciLayoutReference(dest, 'v1'), cacheDir, c.mode), { platform: image.platform, signal: controller.signal })
          } else {
            const from = new BlobCache(new OciLayoutReference(srcLayout, 'v1'), cacheDir, c.mode)
            await copyImage(from, registryRef(drip.host, `rel/push-${id}:v1`, FAST), { signal: controller.signal })
          }
        }
        try {
          await Promise.race([
            copy(),
            new Promise((_, reject) => (stuck = setTimeout(() => reject(new Error(`${hung.message}; the abort did not end it either`)), CASE_MS + 10_000))),
          ])
        } catch (err) {
          outcome = err
        } finally {
          clearTimeout(timer)
          clearTimeout(stuck)
          faults.setRules([])
          drip.setRules([])
        }
        if (controller.signal.aborted) throw outcome
        figures.cases++
        figures.slowestMs = Math.max(figures.slowestMs, Date.now() - started)
        figures.faultsInjected += faults.requests.filter((r) => r.fault).length + (drip.dripped - drippedBefore)
        if (outcome === undefined) {
          figures.succeeded++
          const written = c.direction === 'push' ? registryRef(registry.host, `rel/push-${id}:v1`) : new OciLayoutReference(dest, 'v1')
          const content = await imageContent(written)
          expect(content.diffIDs).toEqual(wantDiffIDs)
          expect(content.configDiffIDs).toEqual(wantDiffIDs)
          // a manifest fetched by digest was verified: unchanged unless compression was changed
          if (c.direction !== 'pull' && c.direction !== 'push' && c.mode === 'preserve') expect(content.manifestDigest).toBe(image.manifestDigest)
        } else {
          figures.failed++
          if (!isImageError(outcome)) throw new Error(`untyped failure: ${(outcome as Error)?.stack ?? String(outcome)}`)
          figures.codes[outcome.code] = (figures.codes[outcome.code] ?? 0) + 1
          if (c.direction !== 'push') {
            expect(entryNames(await checkLayoutDir(dest))).toEqual([])
          } else {
            // a push whose manifest answer was lost may have tagged it: then the tag is whole
            const tagged = await imageContent(registryRef(registry.host, `rel/push-${id}:v1`)).catch((e: unknown) => e)
            if (!isImageError(tagged, 'MANIFEST_UNKNOWN')) expect(tagged).toMatchObject({ diffIDs: wantDiffIDs })
          }
        }
        const layout = await checkLayoutDir(dest)
        expect(layout.damage).toEqual([])
        expect(layout.leftovers).toEqual([])
        const cache = await checkBlobCacheDir(cacheDir)
        figures.corrupt += cache.damage.length
        expect(cache.damage).toEqual([])
        expect(cache.leftovers).toEqual([])
        await rm(dest, { recursive: true, force: true })
      }),
      { numRuns: CASES, seed, endOnFailure: true, examples: REGRESSIONS },
    )
    console.log(JSON.stringify(recordFigures('registry-faults', figures)))
  }, Math.max(180_000, CASES * 3000))
})
