// Remote.download: a large blob arrives in shared pieces hashed on the hashing thread, a body
// cut short is resumed with Range, and wrong bytes are never named. The registry is a small
// in-process HTTP server on 127.0.0.1.
import { randomBytes } from 'node:crypto'
import { readFile, readdir } from 'node:fs/promises'
import { type Server, createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { type Digest, digestOf } from '../digest.js'
import { tempLeftovers, testDir } from '../../test/helpers/conformance.js'
import { THREAD_HASH_MIN } from '../io/blob-file.js'
import { blobPath } from './blobs.js'
import { cacheName } from './names.js'
import { Remote } from './remote.js'

const good = randomBytes(THREAD_HASH_MIN * 3 + 12_345)
const bad = Buffer.from(good)
bad[bad.length >> 1] ^= 1
const blobs = new Map([
  [digestOf(good), good],
  [digestOf('what the server calls it'), bad],
])

let server: Server
let host: string
/** Whole-blob answers to cut after half the body (the next request then resumes). */
let cuts = 0
const ranges: string[] = []

beforeAll(async () => {
  server = createServer((req, res) => {
    const m = /^\/v2\/test\/app\/blobs\/(sha256:[0-9a-f]{64})$/.exec(req.url ?? '')
    if (req.url === '/v2/') return void res.writeHead(200).end('{}')
    const data = m && blobs.get(m[1] as Digest)
    if (!data) return void res.writeHead(404).end()
    const range = /^bytes=(\d+)-$/.exec(req.headers.range ?? '')
    if (range) {
      ranges.push(req.headers.range!)
      const from = Number(range[1])
      res.writeHead(206, { 'content-length': data.length - from, 'content-range': `bytes ${from}-${data.length - 1}/${data.length}` })
      return void res.end(data.subarray(from))
    }
    res.writeHead(200, { 'content-length': data.length })
    if (cuts > 0) {
      cuts--
      res.write(data.subarray(0, data.length >> 1), () => res.destroy())
    } else res.end(data)
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  host = `127.0.0.1:${(server.address() as AddressInfo).port}`
})

afterAll(() => new Promise<void>((resolve) => server.close(() => resolve())))

function remote(): Remote {
  return new Remote(cacheName(`${host}/test/app:1`).ref, { tlsVerify: false, retry: { attempts: 2, baseDelay: 10 } })
}

describe('Remote.download', () => {
  it('stores a large blob, resuming a body cut in the middle', async () => {
    const dir = await testDir()
    cuts = 1
    ranges.length = 0
    const d = { digest: digestOf(good), size: good.length }
    expect(await remote().download(dir, d)).toBe(good.length)
    // one resume, from the last byte received: at most the half that was sent (a reset can
    // drop what the kernel held unread), and more than nothing
    expect(ranges).toHaveLength(1)
    const from = Number(/^bytes=(\d+)-$/.exec(ranges[0])?.[1])
    expect(from).toBeGreaterThan(0)
    expect(from).toBeLessThanOrEqual(good.length >> 1)
    expect((await readFile(blobPath(dir, d.digest))).equals(good)).toBe(true)
    expect(await tempLeftovers(dir)).toEqual([])
  })

  it('fails DIGEST_INVALID when the bytes do not match, and names nothing', async () => {
    const dir = await testDir()
    cuts = 0
    const d = { digest: digestOf('what the server calls it'), size: bad.length }
    await expect(remote().download(dir, d)).rejects.toMatchObject({ code: 'DIGEST_INVALID' })
    expect(await readdir(join(dir, 'blobs', 'sha256'))).toEqual([])
  })

  it('downloads several large blobs at once', async () => {
    const dir = await testDir()
    cuts = 0
    const r = remote()
    const d = { digest: digestOf(good), size: good.length }
    const dirs = [join(dir, 'a'), join(dir, 'b'), join(dir, 'c')]
    await Promise.all(dirs.map((x) => r.download(x, d)))
    for (const x of dirs) expect((await readFile(blobPath(x, d.digest))).equals(good)).toBe(true)
  })
})
