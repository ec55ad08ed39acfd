// Crash safety: a child process copies images through a BlobCache into an `oci:` layout, loads
// archives into an ImageCache and pulls into it from the real registry, and is killed with
// SIGKILL at a random point of that work, round after round on the same directories (some of
// them wiped between rounds so that there is always work to interrupt). After every kill:
// every file named by a digest hashes to its name, every index.json parses, no layout lists an
// image it does not fully hold, and the next run of the same copies succeeds and leaves every
// image whole. `npm test` runs a few kills; the soak raises BLOBCACHE_SOAK_KILLS.
import { mkdir, mkdtemp, readdir, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { ImageCache } from '../../src/image-cache/index.js'
import { type ChildResult, distReady, knob, recordFigures, runSeed, seededRandom, startChild } from '../helpers/children.js'
import { type Damage, checkBlobCacheDir, checkLayoutDir, entryNames } from '../helpers/invariants.js'
import { peer } from '../helpers/peers.js'
import { type TestRegistry, registryRef, startRegistry } from '../helpers/registry.js'
import { fixturePaths, standardImages, writeArchive, writeImageTo, writeSourceLayout } from '../helpers/reliability-fixtures.js'

const WORKER = resolve(__dirname, 'children/worker.mjs')
/** SIGKILLs to deliver (each followed by a recovery run). */
const KILLS = knob('kills', 8)
/** Time cap of the kill rounds, seconds. */
const SECONDS = knob('crash_seconds', 50)
const MODES = ['preserve', 'compress', 'decompress'] as const
const hasRegistry = !!peer('docker-registry')

interface Job {
  kind: 'copy' | 'load' | 'pull'
  [k: string]: unknown
}

describe.skipIf(!distReady('ImageCache', 'BlobCache'))('SIGKILL at random points', () => {
  let root: string
  let registry: TestRegistry | undefined
  let p: ReturnType<typeof fixturePaths>
  let jobs: Job[]
  let names: string[]

  beforeAll(async () => {
    root = await mkdtemp(join(tmpdir(), 'blobcache-rel-crash-'))
    p = fixturePaths(root)
    const images = await standardImages(knob('scale', 1))
    await writeSourceLayout(p.src, images)
    if (hasRegistry) {
      registry = await startRegistry()
      for (const [i, im] of images.entries()) await writeImageTo(registryRef(registry.host, `rel/img-${i}:1`), im)
    }
    jobs = []
    names = []
    for (const [i, im] of images.entries()) {
      jobs.push({ kind: 'copy', src: `oci:${p.src}:img-${i}`, dest: `oci:${p.dest}:img-${i}` })
      names.push(`docker.io/rel/loaded-${i}:1`)
      jobs.push({ kind: 'load', archive: await writeArchive(p.archive(i), im, `docker.io/rel/loaded-${i}:1`) })
      if (registry) {
        names.push(`${registry.host}/rel/img-${i}:1`)
        jobs.push({ kind: 'pull', ref: `${registry.host}/rel/img-${i}:1`, platform: 'linux/amd64' })
      }
    }
  })
  afterAll(async () => {
    await registry?.stop()
    if (root) await rm(root, { recursive: true, force: true })
  })

  /** Everything that must hold after any kill; returns the damage found and what was checked. */
  async function damageAfterKill(): Promise<{ damage: Damage[]; hashed: number; leftovers: string[] }> {
    const cache = await checkBlobCacheDir(p.cache)
    const dest = await checkLayoutDir(p.dest)
    const images = await checkLayoutDir(p.imageCache, { partialIndexes: true })
    const damage = [...cache.damage, ...dest.damage, ...images.damage]
    // the ImageCache's own view: it opens, and every name it lists is whole (layers hashed)
    if (images.entries.length || (await readdir(p.imageCache).catch(() => [])).length) {
      const ic = await ImageCache.open(p.imageCache)
      for (const e of await ic.list()) {
        const check = await ic.checkImage(e.name, 'linux/amd64', { verify: true })
        if (!check.complete) damage.push({ path: `${p.imageCache}: ${e.name}`, why: check.missing.join('; ') })
      }
    }
    const leftovers = [...cache.leftovers.map((n) => `cache/${n}`), ...dest.leftovers.map((n) => `dest/${n}`), ...images.leftovers.map((n) => `image-cache/${n}`)]
    return { damage, hashed: cache.hashed + dest.hashed + images.hashed, leftovers }
  }

  function run(plan: object) {
    return startChild(WORKER, [JSON.stringify(plan)])
  }

  it(`${KILLS} kills leave only whole entries, and the next copy succeeds`, async () => {
    const seed = runSeed()
    const random = seededRandom(seed)
    const pick = <T>(xs: readonly T[]): T => xs[Math.floor(random() * xs.length)]
    const base = { cacheDir: p.cache, imageCache: p.imageCache, registry: { tlsVerify: false } }
    await mkdir(p.cache, { recursive: true })

    // calibration: how long a whole run takes from nothing
    const first = await run({ ...base, mode: 'compress', algorithm: 'gzip', jobs }).done
    expect(first.stderr).toBe('')
    expect(first.code).toBe(0)
    const passMs = first.ms

    const figures = {
      seed, kills: 0, finishedBeforeKill: 0, recoveries: 0, filesHashed: 0, corrupt: 0, leftovers: 0,
      killedDuring: {} as Record<string, number>, passMs,
    }
    const leftovers = new Set<string>()
    const deadline = Date.now() + SECONDS * 1000
    try {
      for (let round = 0; figures.kills < KILLS && Date.now() < deadline; round++) {
        // wipe some state so that the run has real work to be interrupted in
        if (random() < 0.5) await rm(p.dest, { recursive: true, force: true })
        if (random() < 0.5) await rm(p.imageCache, { recursive: true, force: true })
        if (random() < 0.35) await rm(p.cache, { recursive: true, force: true })
        else for (const n of await readdir(p.cache).catch(() => [])) if (random() < 0.4) await rm(join(p.cache, n), { force: true })
        await mkdir(p.cache, { recursive: true })

        const order = [...jobs].sort(() => random() - 0.5)
        const plan = { ...base, mode: pick(MODES), algorithm: pick(['gzip', 'zstd']), jobs: order }
        const child = run(plan)
        const waitJob = Math.floor(random() * (order.length + 1)) - 1
        await child.waitFor(waitJob < 0 ? 'ready' : `job ${waitJob} ok`).catch(() => undefined)
        await sleep(random() * (passMs / order.length) * 1.5)
        const killed: ChildResult = await child.kill()
        if (killed.signal === 'SIGKILL') {
          figures.kills++
          const doneJobs = (killed.stdout.match(/^job \d+ ok$/gm) ?? []).length
          const during = !killed.stdout.includes('ready') ? 'startup' : doneJobs < order.length ? order[doneJobs].kind : 'exit'
          figures.killedDuring[during] = (figures.killedDuring[during] ?? 0) + 1
        } else {
          expect(killed.stderr).toBe('')
          expect(killed.code).toBe(0)
          figures.finishedBeforeKill++
        }

        const after = await damageAfterKill()
        figures.filesHashed += after.hashed
        figures.corrupt += after.damage.length
        for (const n of after.leftovers) leftovers.add(n)
        expect(after.damage, `round ${round} (seed ${seed})`).toEqual([])

        // the next copy succeeds, and leaves everything whole
        const again = await run({ ...plan, jobs }).done
        expect(again.stderr, `round ${round} (seed ${seed})`).toBe('')
        expect(again.code).toBe(0)
        figures.recoveries++
        const whole = await damageAfterKill()
        expect(whole.damage, `round ${round} (seed ${seed})`).toEqual([])
        expect(entryNames(await checkLayoutDir(p.dest))).toEqual(jobs.filter((j) => j.kind === 'copy').map((_, i) => `img-${i}`))
        const ic = await ImageCache.open(p.imageCache)
        expect((await ic.list()).map((e) => e.name)).toEqual([...names].sort())
      }
    } finally {
      // recorded even when a round fails, so that the soak reports how far it got
      figures.leftovers = leftovers.size
      console.log(JSON.stringify(recordFigures('crash', figures)))
    }
    expect(figures.kills).toBeGreaterThanOrEqual(Math.min(KILLS, 3))
  }, SECONDS * 1000 + 120_000)
})
