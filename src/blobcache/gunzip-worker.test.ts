import { createHash, randomBytes } from 'node:crypto'
import { mkdtemp, readFile, readdir, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { gzipSync } from 'node:zlib'
import { afterEach, describe, expect, it } from 'vitest'
import { GunzipOnWorker } from './gunzip-worker.js'

let dir: string
afterEach(async () => {
  if (dir) await rm(dir, { recursive: true, force: true })
})

async function feed(job: GunzipOnWorker, bytes: Buffer, chunk = 100_000) {
  for (let i = 0; i < bytes.length; i += chunk) await job.write(bytes.subarray(i, i + chunk))
  job.end()
  return job.done
}

describe('GunzipOnWorker', () => {
  it('decompresses on a worker into a temp file named by nothing, and reports the sha256', async () => {
    dir = await mkdtemp(join(tmpdir(), 'gunzip-worker-'))
    const plain = Buffer.concat([randomBytes(3 << 20), Buffer.alloc(5 << 20, 'text ')])
    const errors: unknown[] = []
    const jobs = [0, 1, 2].map(() => new GunzipOnWorker(dir, 'sha256:x', (_w, e) => errors.push(e)))
    const results = await Promise.all(jobs.map((j) => feed(j, gzipSync(plain))))
    const want = `sha256:${createHash('sha256').update(plain).digest('hex')}`
    for (const r of results) {
      expect(r?.digest).toBe(want)
      expect((await readFile(r!.tmp)).equals(plain)).toBe(true)
      expect(r!.tmp.startsWith(join(dir, '.tmp-'))).toBe(true)
    }
    expect(errors).toEqual([])
  })

  it('corrupt input resolves undefined, reports the failure once and leaves no file', async () => {
    dir = await mkdtemp(join(tmpdir(), 'gunzip-worker-'))
    const bad = gzipSync(randomBytes(1 << 20))
    bad.fill(0x55, 100, 2000)
    const errors: unknown[] = []
    const result = await feed(new GunzipOnWorker(dir, 'sha256:y', (_w, e) => errors.push(e)), bad)
    expect(result).toBeUndefined()
    expect(errors).toHaveLength(1)
    expect(await readdir(dir)).toEqual([])
  })

  it('abort resolves undefined without reporting an error and leaves no file', async () => {
    dir = await mkdtemp(join(tmpdir(), 'gunzip-worker-'))
    const errors: unknown[] = []
    const job = new GunzipOnWorker(dir, 'sha256:z', (_w, e) => errors.push(e))
    await job.write(gzipSync(randomBytes(1 << 20)).subarray(0, 50_000))
    job.abort()
    expect(await job.done).toBeUndefined()
    expect(errors).toEqual([])
    expect(await readdir(dir)).toEqual([])
  })
})
