// Child process of the reliability tests and the soak: runs a plan of jobs against the built
// package (BLOBCACHE_DIST, default dist/index.js) and prints one line per job, so that the
// parent can wait for a point in the work and kill it there.
//
//   node worker.mjs '<plan JSON>'
//
// plan: { startAt?: ms since epoch, cacheDir: blob-cache directory, mode: 'preserve' | 'compress'
//         | 'decompress', algorithm: 'gzip' | 'zstd', imageCache?: dir, registry?: options,
//         jobs: [{ kind: 'copy', src, dest } | { kind: 'load', archive } | { kind: 'pull', ref, platform }
//                | { kind: 'name', ref, as }] }
// copy:  copyImage(BlobCache(src), BlobCache(dest)) with image names as parseImageName takes them
// load:  ImageCache.imageLoad(createReadStream(archive))
// pull:  ImageCache.imagePull(ref, { platforms: [platform] })
// name:  ImageCache.descriptorWrite(as, findDescriptor(ref))
// Prints `ready`, then `job <i> ok` after each job, then a JSON line of the caches' stats.
import { createReadStream } from 'node:fs'
import { dirname, resolve } from 'node:path'
import { fileURLToPath, pathToFileURL } from 'node:url'

const dist = process.env.BLOBCACHE_DIST ?? resolve(dirname(fileURLToPath(import.meta.url)), '../../../dist/index.js')
const { BlobCache, ImageCache, copyImage, parseImageName } = await import(pathToFileURL(dist).href)

const plan = JSON.parse(process.argv[2])
const cacheOpts = { compressAlgorithm: plan.algorithm ?? 'gzip' }
const totals = { hits: 0, misses: 0, errors: 0 }
const imageCache = plan.imageCache ? await ImageCache.open(plan.imageCache, { registry: plan.registry }) : undefined

process.stdout.write('ready\n')
while (plan.startAt && Date.now() < plan.startAt) await new Promise((r) => setTimeout(r, 2))

for (const [i, job] of plan.jobs.entries()) {
  if (job.kind === 'copy') {
    const from = new BlobCache(parseImageName(job.src), plan.cacheDir, plan.mode, cacheOpts)
    const to = new BlobCache(parseImageName(job.dest), plan.cacheDir, plan.mode, cacheOpts)
    await copyImage(from, to)
    for (const c of [from, to]) for (const k of Object.keys(totals)) totals[k] += c.stats[k]
  } else if (job.kind === 'load') {
    await imageCache.imageLoad(createReadStream(job.archive, { highWaterMark: 1 << 20 }))
  } else if (job.kind === 'pull') {
    await imageCache.imagePull(job.ref, { platforms: [job.platform] })
  } else if (job.kind === 'name') {
    const d = await imageCache.findDescriptor(job.ref)
    if (!d) throw new Error(`${job.ref} is not in the image cache`)
    await imageCache.descriptorWrite(job.as, d)
  } else {
    throw new Error(`unknown job ${JSON.stringify(job)}`)
  }
  process.stdout.write(`job ${i} ok\n`)
}
process.stdout.write(JSON.stringify(totals) + '\n')
