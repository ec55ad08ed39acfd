// Eight processes copy overlapping images at once into ONE blob-cache directory, ONE `oci:`
// layout and ONE ImageCache (imageLoad of archives, imagePull from the real registry, and
// descriptorWrite). Afterwards every image each process wrote is listed and whole, the cache's
// notes are complete, and nothing is corrupt or left over. Children run the built package.
import { mkdir } from 'node:fs/promises'
import { join, resolve } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { ImageCache } from '../../src/image-cache/index.js'
import { distReady, knob, recordFigures, startChild } from '../helpers/children.js'
import { testDir } from '../helpers/conformance.js'
import { checkBlobCacheDir, checkLayoutDir, entryNames } from '../helpers/invariants.js'
import { peer } from '../helpers/peers.js'
import { registryRef, startRegistry, type TestRegistry } from '../helpers/registry.js'
import { fixturePaths, standardImages, writeArchive, writeImageTo, writeSourceLayout } from '../helpers/reliability-fixtures.js'

const WORKER = resolve(__dirname, 'children/worker.mjs')
const PROCESSES = 8
const ROUNDS = knob('concurrency_rounds', 1)
const hasRegistry = !!peer('docker-registry')

describe.skipIf(!distReady('ImageCache', 'BlobCache'))('many processes, one blob cache, one oci: layout, one ImageCache', () => {
  let registry: TestRegistry | undefined
  beforeAll(async () => {
    if (hasRegistry) registry = await startRegistry()
  })
  afterAll(async () => {
    await registry?.stop()
  })

  it(`${PROCESSES} processes copying overlapping images leave every image whole and no corrupt entry`, async () => {
    const figures = { rounds: 0, processes: 0, imagesWritten: 0, filesHashed: 0, corrupt: 0, leftovers: 0 }
    for (let round = 0; round < ROUNDS; round++) {
      const root = await testDir('blobcache-rel-conc-')
      const p = fixturePaths(root)
      const images = await standardImages(0.6)
      await writeSourceLayout(p.src, images)
      await mkdir(p.cache)
      if (registry) for (const [i, im] of images.entries()) await writeImageTo(registryRef(registry.host, `rel/img-${i}:1`), im)
      await ImageCache.open(p.imageCache)

      const startAt = Date.now() + 2000
      const children = []
      const expectedTags: string[] = []
      const expectedNames: string[] = []
      for (let proc = 0; proc < PROCESSES; proc++) {
        const jobs: unknown[] = []
        for (const i of [proc % 4, (proc + 1) % 4]) {
          const tag = `p${proc}-img-${i}`
          expectedTags.push(tag)
          jobs.push({ kind: 'copy', src: `oci:${p.src}:img-${i}`, dest: `oci:${p.dest}:${tag}` })
          const name = `docker.io/rel/img-${i}:p${proc}`
          expectedNames.push(name)
          jobs.push({ kind: 'load', archive: await writeArchive(join(root, `in-${proc}-${i}.tar`), images[i], name) })
          if (registry) {
            jobs.push({ kind: 'pull', ref: `${registry.host}/rel/img-${i}:1`, platform: 'linux/amd64' })
            jobs.push({ kind: 'name', ref: `${registry.host}/rel/img-${i}:1`, as: `docker.io/rel/pulled-${i}:p${proc}` })
            expectedNames.push(`docker.io/rel/pulled-${i}:p${proc}`)
            if (!expectedNames.includes(`${registry.host}/rel/img-${i}:1`)) expectedNames.push(`${registry.host}/rel/img-${i}:1`)
          }
        }
        const plan = { startAt, cacheDir: p.cache, mode: 'compress', algorithm: proc % 2 ? 'zstd' : 'gzip', imageCache: p.imageCache, registry: { tlsVerify: false }, jobs }
        children.push(startChild(WORKER, [JSON.stringify(plan)]).done)
      }
      const results = await Promise.all(children)
      for (const r of results) {
        expect(r.stderr).toBe('')
        expect(r.code).toBe(0)
        expect(JSON.parse(r.stdout.trim().split('\n').pop()!).errors).toBe(0)
      }

      // one oci: layout: every tag of every process listed, each image whole
      const dest = await checkLayoutDir(p.dest)
      expect(dest.damage).toEqual([])
      expect(dest.leftovers).toEqual([])
      expect(entryNames(dest)).toEqual([...expectedTags].sort())
      // one ImageCache: every name, each whole (layers hashed)
      const cacheLayout = await checkLayoutDir(p.imageCache, { partialIndexes: true })
      expect(cacheLayout.damage).toEqual([])
      expect(cacheLayout.leftovers).toEqual([])
      const cache = await ImageCache.open(p.imageCache)
      expect((await cache.list()).map((e) => e.name)).toEqual([...expectedNames].sort())
      for (const name of expectedNames) expect(await cache.imageInCache(name, 'linux/amd64', { verify: true })).toBe(true)
      // one blob cache: entries hash to their names, notes complete, nothing left over
      const blobCache = await checkBlobCacheDir(p.cache, { complete: true })
      expect(blobCache.damage).toEqual([])
      expect(blobCache.leftovers).toEqual([])

      figures.rounds++
      figures.processes += PROCESSES
      figures.imagesWritten += expectedTags.length + expectedNames.length
      figures.filesHashed += dest.hashed + cacheLayout.hashed + blobCache.hashed
      figures.corrupt += dest.damage.length + cacheLayout.damage.length + blobCache.damage.length
      figures.leftovers += dest.leftovers.length + cacheLayout.leftovers.length + blobCache.leftovers.length
    }
    console.log(JSON.stringify(recordFigures('concurrency', figures)))
  }, ROUNDS * 90_000 + 30_000)
})
