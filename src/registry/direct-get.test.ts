import { execFile } from 'node:child_process'
import { createHash, randomBytes } from 'node:crypto'
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import type { Socket } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Readable } from 'node:stream'
import { createSecureContext, createServer as createTlsServer } from 'node:tls'
import { promisify } from 'node:util'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { DIRECT_BUFFER_BYTES, DIRECT_PIECE_BYTES, type DirectConnection, type DirectResponse, directGet, parseHead } from './direct-get.js'
import { RegistryClient } from './client.js'
import { type TcpServer, startTcpServer } from '../../test/helpers/tcp-server.js'

const plain: DirectConnection = { verify: false, context: undefined, idleTimeout: 5000 }

/** A TCP server on 127.0.0.1 that answers each request head with `answer(socket, head)`. */
async function rawServer(answer: (socket: Socket, head: string) => void): Promise<{ url: (path: string) => URL; heads: string[] }> {
  const heads: string[] = []
  const server = await startTcpServer((socket) => {
    let got = ''
    socket.on('data', (d) => {
      got += d.toString('latin1')
      const end = got.indexOf('\r\n\r\n')
      if (end >= 0 && heads.length < 1000) {
        const head = got.slice(0, end)
        got = ''
        heads.push(head)
        answer(socket, head)
      }
    })
  })
  servers.push(server)
  return { url: (path) => new URL(`http://${server.host}${path}`), heads }
}

const servers: TcpServer[] = []
afterEach(async () => {
  for (const server of servers.splice(0)) await server.close()
})

async function readAll(body: Readable): Promise<{ bytes: Buffer; pieces: Buffer[] }> {
  const pieces: Buffer[] = []
  for await (const p of body) pieces.push(p as Buffer)
  return { bytes: Buffer.concat(pieces), pieces }
}

function sha(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex')
}

describe('directGet', () => {
  it('reads a Content-Length body into pieces from allocate, and sends the given headers with connection: close', async () => {
    const data = randomBytes(5 * DIRECT_PIECE_BYTES + 12345)
    const srv = await rawServer((s, _head) => {
      s.write(`HTTP/1.1 200 OK\r\nContent-Length: ${data.length}\r\nDocker-Content-Digest: x\r\nX-Twice: a\r\nX-Twice: b\r\n\r\n`)
      // in uneven writes, so that reads end anywhere
      for (let at = 0; at < data.length; at += 300_001) s.write(data.subarray(at, at + 300_001))
    })
    const given: Buffer[] = []
    const allocate = (n: number) => {
      const b = Buffer.alloc(n)
      given.push(b)
      return b
    }
    const res = await directGet(srv.url('/v2/r/blobs/sha256:abc?x=1'), { headers: { authorization: 'Bearer t', range: 'bytes=0-' }, allocate }, plain)
    expect(res).toBeDefined()
    expect(res!.statusCode).toBe(200)
    expect(res!.headers['content-length']).toBe(String(data.length))
    expect(res!.headers['docker-content-digest']).toBe('x')
    expect(res!.headers['x-twice']).toBe('a, b')
    const { bytes, pieces } = await readAll(res!)
    expect(sha(bytes)).toBe(sha(data))
    // every piece is a view of a buffer allocate gave, filled to at least 1 MiB but the last
    for (const [i, p] of pieces.entries()) {
      expect(given.some((g) => g.buffer === p.buffer)).toBe(true)
      expect(p.length).toBeLessThanOrEqual(DIRECT_BUFFER_BYTES)
      if (i < pieces.length - 1) expect(p.length).toBeGreaterThanOrEqual(DIRECT_PIECE_BYTES)
    }
    expect(given.every((g) => g.length === DIRECT_BUFFER_BYTES)).toBe(true)
    const head = srv.heads[0].split('\r\n')
    expect(head[0]).toBe('GET /v2/r/blobs/sha256:abc?x=1 HTTP/1.1')
    expect(head).toContain(`host: ${srv.url('/').host}`)
    expect(head).toContain('authorization: Bearer t')
    expect(head).toContain('range: bytes=0-')
    expect(head).toContain('connection: close')
  })

  it('reads a body that ends with the connection, and one of zero bytes', async () => {
    const data = randomBytes(3 << 20)
    const srv = await rawServer((s, head) => {
      if (head.includes('/empty')) s.end('HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n')
      else s.end(Buffer.concat([Buffer.from('HTTP/1.1 200 OK\r\n\r\n'), data]))
    })
    const res = await directGet(srv.url('/whole'), { headers: {} }, plain)
    expect(sha((await readAll(res!)).bytes)).toBe(sha(data))
    const empty = await directGet(srv.url('/empty'), { headers: {} }, plain)
    expect((await readAll(empty!)).bytes.length).toBe(0)
  })

  it('gives an error answer with its body, and never reads past Content-Length', async () => {
    const srv = await rawServer((s) => s.write('HTTP/1.1 404 Not Found\r\nContent-Length: 29\r\nContent-Type: application/json\r\n\r\n{"errors":[{"code":"BLOB_UN"}]}trailing garbage'))
    const res = await directGet(srv.url('/missing'), { headers: {} }, plain)
    expect(res!.statusCode).toBe(404)
    expect((await readAll(res!)).bytes.toString()).toBe('{"errors":[{"code":"BLOB_UN"}')
  })

  it('resolves undefined, closing the connection, for an answer in a form it does not read (chunked)', async () => {
    let closed = false
    const srv = await rawServer((s) => {
      s.on('close', () => (closed = true))
      s.write('HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n')
    })
    await expect(directGet(srv.url('/chunked'), { headers: {} }, plain)).resolves.toBeUndefined()
    await expect.poll(() => closed).toBe(true)
  })

  it('errors the body with ECONNRESET when the connection ends before Content-Length bytes', async () => {
    const srv = await rawServer((s) => s.end(Buffer.concat([Buffer.from('HTTP/1.1 200 OK\r\nContent-Length: 3000000\r\n\r\n'), randomBytes(2_000_000)])))
    const res = await directGet(srv.url('/cut'), { headers: {} }, plain)
    await expect(readAll(res!)).rejects.toMatchObject({ code: 'ECONNRESET' })
  })

  it('rejects a connection closed before the answer, a malformed answer and a refused connection, typed', async () => {
    const srv = await rawServer((s, head) => {
      if (head.includes('/bad')) s.end('SMTP ready\r\n\r\n')
      else s.destroy()
    })
    await expect(directGet(srv.url('/none'), { headers: {} }, plain)).rejects.toMatchObject({ code: 'ECONNRESET' })
    await expect(directGet(srv.url('/bad'), { headers: {} }, plain)).rejects.toMatchObject({ code: 'HPE_INVALID_CONSTANT' })
    const port = srv.url('/').port
    for (const server of servers.splice(0)) await server.close()
    await expect(directGet(new URL(`http://127.0.0.1:${port}/x`), { headers: {} }, plain)).rejects.toMatchObject({ code: 'ECONNREFUSED' })
  })

  it('refuses a header that would split the request, sending nothing', async () => {
    const srv = await rawServer((s) => s.end('HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n'))
    await expect(directGet(srv.url('/x'), { headers: { authorization: 'Bearer a\r\nX-Evil: 1' } }, plain)).rejects.toMatchObject({ code: 'ERR_INVALID_CHAR' })
    await expect(directGet(srv.url('/x'), { headers: { 'bad name': 'v' } }, plain)).rejects.toMatchObject({ code: 'ERR_INVALID_CHAR' })
    expect(srv.heads).toEqual([])
  })

  it('stops reading while the body is not read (memory stays bounded), and an abort ends it with the reason', async () => {
    const size = 64 << 20
    let sent = 0
    const srv = await rawServer((s) => {
      s.write(`HTTP/1.1 200 OK\r\nContent-Length: ${size}\r\n\r\n`)
      const chunk = Buffer.alloc(1 << 20, 1)
      const more = () => {
        while (sent < size) {
          sent += chunk.length
          if (!s.write(chunk)) return void s.once('drain', more)
        }
      }
      more()
    })
    let allocated = 0
    const ac = new AbortController()
    const res = await directGet(srv.url('/big'), { headers: {}, signal: ac.signal, allocate: (n) => (allocated++, Buffer.allocUnsafe(n)) }, plain)
    await new Promise((r) => setTimeout(r, 300))
    // nothing read: a piece or two (and the socket buffers), not the 64 pieces sent
    expect(allocated).toBeLessThanOrEqual(3)
    expect(sent).toBeLessThan(size)
    const reason = new Error('stop now')
    const failed = readAll(res!)
    ac.abort(reason)
    await expect(failed).rejects.toBe(reason)
    const before = directGet(srv.url('/big'), { headers: {}, signal: AbortSignal.abort(reason) }, plain)
    await expect(before).rejects.toBe(reason)
  })

  it('takes a response head split over many reads, and refuses one longer than 64 KiB', async () => {
    const srv = await rawServer((s, head) => {
      if (head.includes('/long')) {
        s.write('HTTP/1.1 200 OK\r\n')
        for (let i = 0; i < 2000; i++) s.write(`X-Filler-${i}: ${'y'.repeat(40)}\r\n`)
        return
      }
      const text = 'HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 5-9/10\r\nContent-Length: 5\r\n\r\n56789'
      let i = 0
      const drip = () => {
        if (i >= text.length) return s.end()
        s.write(text.slice(i, i + 7))
        i += 7
        setTimeout(drip, 1)
      }
      drip()
    })
    const res = await directGet(srv.url('/drip'), { headers: {} }, plain)
    expect(res!.statusCode).toBe(206)
    expect(res!.headers['content-range']).toBe('bytes 5-9/10')
    expect((await readAll(res!)).bytes.toString()).toBe('56789')
    await expect(directGet(srv.url('/long'), { headers: {} }, plain)).rejects.toMatchObject({ code: 'HPE_HEADER_OVERFLOW' })
  })
})

describe('directGet over TLS', () => {
  let dir: string
  let key: Buffer
  let cert: Buffer
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'direct-get-tls-'))
    await promisify(execFile)('openssl', [
      'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem'),
      '-days', '1', '-subj', '/CN=registry.test', '-addext', 'subjectAltName=IP:127.0.0.1,DNS:registry.test',
    ])
    key = await readFile(join(dir, 'key.pem'))
    cert = await readFile(join(dir, 'cert.pem'))
  })
  afterAll(() => rm(dir, { recursive: true, force: true }))

  it('reads over https, verifying the server against the context given, and fails an unknown one', async () => {
    const data = randomBytes(3 << 20)
    const server = createTlsServer({ key, cert }, (s) => {
      s.once('data', () => s.end(Buffer.concat([Buffer.from(`HTTP/1.1 200 OK\r\nContent-Length: ${data.length}\r\n\r\n`), data])))
      s.on('error', () => {})
    })
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
    try {
      const { port } = server.address() as { port: number }
      const url = new URL(`https://127.0.0.1:${port}/blob`)
      const trusted = { verify: true, context: createSecureContext({ ca: cert }), idleTimeout: 5000 }
      const res = await directGet(url, { headers: {} }, trusted)
      expect(sha((await readAll(res!)).bytes)).toBe(sha(data))
      await expect(directGet(url, { headers: {} }, { verify: true, context: createSecureContext({ ca: [] }), idleTimeout: 5000 })).rejects.toMatchObject({
        code: expect.stringMatching(/SELF_SIGNED|UNABLE_TO_VERIFY|UNABLE_TO_GET_ISSUER/),
      })
      const unverified = await directGet(url, { headers: {} }, { verify: false, context: undefined, idleTimeout: 5000 })
      expect((await readAll(unverified!)).bytes.length).toBe(data.length)
      // into shared memory (the image cache's slabs) as well
      const shared = await directGet(url, { headers: {}, allocate: (n) => Buffer.from(new SharedArrayBuffer(n)) }, trusted)
      const got = await readAll(shared!)
      expect(got.pieces.every((p) => p.buffer instanceof SharedArrayBuffer)).toBe(true)
      expect(sha(got.bytes)).toBe(sha(data))
    } finally {
      await new Promise((resolve) => server.close(resolve))
    }
  })
})

describe('parseHead', () => {
  it('lower-cases names, joins repeats like Node, keeps set-cookie apart and flags two different lengths', () => {
    const head = parseHead('HTTP/1.1 307 Temporary Redirect\r\nLocation: http://x/y\r\nWWW-Authenticate: Bearer a\r\nwww-authenticate: Basic b\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2')
    expect(head).toEqual({
      status: 307,
      headers: { location: 'http://x/y', 'www-authenticate': 'Bearer a, Basic b', 'set-cookie': ['a=1', 'b=2'] },
    })
    expect(parseHead('HTTP/1.0 200\r\nContent-Length: 1\r\ncontent-length: 2')!.headers['content-length']).toEqual(['1', '2'])
    expect(parseHead('HTTP/1.1 200 OK\r\nContent-Length: 1\r\ncontent-length: 1')!.headers['content-length']).toBe('1')
    expect(parseHead('HTTP/2 200')).toBeUndefined()
    expect(parseHead('HTTP/1.1 200 OK\r\nno colon here')).toBeUndefined()
  })
})

describe('RegistryClient with direct reads', () => {
  it('asks again through Node\'s client when the direct answer is chunked, and the body is whole', async () => {
    const data = randomBytes(2 << 20)
    const http = await import('node:http')
    let blobGets = 0
    const server = http.createServer((req, res) => {
      if (req.url === '/v2/') return res.end('{}')
      blobGets++
      res.writeHead(200, { 'content-type': 'application/octet-stream' }) // no length: chunked
      res.write(data.subarray(0, 1000))
      res.end(data.subarray(1000))
    })
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
    try {
      const { port } = server.address() as { port: number }
      const client = new RegistryClient(`127.0.0.1:${port}`, { tlsVerify: false, env: {} })
      const res = await client.send({ method: 'GET', path: '/v2/r/blobs/sha256:x', repository: 'r', scopes: [], kind: 'blob', action: 'test', direct: {} })
      expect(sha((await readAll(res.body)).bytes)).toBe(sha(data))
      expect(blobGets).toBe(2)
      // and a plain Content-Length answer is read directly: one request
      const server2 = http.createServer((req, res) => (req.url === '/v2/' ? res.end('{}') : (blobGets++, res.end(data))))
      await new Promise<void>((resolve) => server2.listen(0, '127.0.0.1', resolve))
      const client2 = new RegistryClient(`127.0.0.1:${(server2.address() as { port: number }).port}`, { tlsVerify: false, env: {} })
      const res2 = await client2.send({ method: 'GET', path: '/v2/r/blobs/sha256:x', repository: 'r', scopes: [], kind: 'blob', action: 'test', direct: {} })
      expect(res2.body).toHaveProperty('statusCode', 200)
      expect(sha((await readAll(res2.body as DirectResponse)).bytes)).toBe(sha(data))
      expect(blobGets).toBe(3)
      server2.closeAllConnections()
      await new Promise((resolve) => server2.close(resolve))
    } finally {
      server.closeAllConnections()
      await new Promise((resolve) => server.close(resolve))
    }
  })
})
