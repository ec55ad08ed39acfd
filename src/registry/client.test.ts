// RegistryClient.warmUp: the `/v2/` ping started before any request needs it is the one the
// first request uses, and abandonWarmUp stops one that nothing used (the process need not wait
// for a registry that does not answer).
import { afterEach, describe, expect, it } from 'vitest'
import { RegistryClient } from './client.js'
import { type TcpServer, startTcpServer } from '../../test/helpers/tcp-server.js'

interface Listener {
  host: string
  /** Request lines received, in order. */
  requests: string[]
  /** Connections closed by the client so far. */
  closed: () => number
  /** TLS ClientHellos received so far. */
  hellos: () => number
}

const servers: TcpServer[] = []
afterEach(async () => {
  for (const server of servers.splice(0)) await server.close()
})

/** A plain HTTP/1.1 server on 127.0.0.1 that answers every request with 200 and `{}`, and a TLS hello with 400; `silent`, nothing at all. */
async function listen(silent: boolean): Promise<Listener> {
  const requests: string[] = []
  let closed = 0
  let hellos = 0
  const server = await startTcpServer((socket) => {
    socket.on('close', () => closed++)
    let got = ''
    socket.on('data', (d) => {
      // a TLS ClientHello: refused as Go's HTTP server refuses it (the https attempt then fails)
      if (got === '' && d[0] === 0x16 && ++hellos) return void (silent || socket.end('HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n'))
      got += d.toString('latin1')
      let end: number
      while ((end = got.indexOf('\r\n\r\n')) >= 0) {
        const line = got.slice(0, got.indexOf('\r\n'))
        got = got.slice(end + 4)
        requests.push(line)
        if (!silent) socket.write('HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}')
      }
    })
  })
  servers.push(server)
  return { host: server.host, requests, closed: () => closed, hellos: () => hellos }
}

describe('RegistryClient ping without TLS verification, on loopback', () => {
  it('asks plain HTTP first: a plain-HTTP registry never sees a TLS hello', async () => {
    const srv = await listen(false)
    const client = new RegistryClient(srv.host, { tlsVerify: false, env: {} })
    expect((await client.base()).protocol).toBe('http:')
    expect(srv.requests).toEqual(['GET /v2/ HTTP/1.1'])
    expect(srv.hellos()).toBe(0)
  })

  it('with verification, only https is tried (and fails against a plain-HTTP server)', async () => {
    const srv = await listen(false)
    const client = new RegistryClient(srv.host, { tlsVerify: true, env: {} })
    await expect(client.base()).rejects.toMatchObject({ code: 'REGISTRY_ERROR', status: 0 })
    expect(srv.requests).toEqual([])
    expect(srv.hellos()).toBeGreaterThan(0)
  })
})

describe('RegistryClient.warmUp', () => {
  it('starts the ping at once, and the first request uses it instead of pinging again', async () => {
    const srv = await listen(false)
    const client = new RegistryClient(srv.host, { tlsVerify: false, env: {} })
    client.warmUp()
    await expect.poll(() => srv.requests).toEqual(['GET /v2/ HTTP/1.1'])
    await client.send({ method: 'GET', path: '/v2/r/tags/list', repository: 'r', scopes: [], kind: 'tags', action: 'listing', ok: [200] })
    expect(srv.requests).toEqual(['GET /v2/ HTTP/1.1', 'GET /v2/r/tags/list HTTP/1.1'])
    client.abandonWarmUp() // used: nothing to stop
  })

  it('abandonWarmUp closes a ping nothing waited for; a later request pings anew', async () => {
    const silent = await listen(true)
    const client = new RegistryClient(silent.host, { tlsVerify: false, env: {}, pingTimeout: 60_000 })
    client.warmUp()
    await expect.poll(() => silent.requests.length).toBe(1)
    const before = silent.closed()
    const started = Date.now()
    client.abandonWarmUp()
    // the attempt is closed at once, long before the ping's timeout (on loopback plain HTTP is
    // asked first, and https is not tried once the ping is stopped)
    await expect.poll(() => silent.closed() - before, { timeout: 2000 }).toBe(1)
    expect(silent.hellos()).toBe(0)
    expect(Date.now() - started).toBeLessThan(2000)
    const ac = new AbortController()
    const pending = client.base(ac.signal)
    await expect.poll(() => silent.requests.length).toBe(2)
    ac.abort(new Error('enough'))
    await expect(pending).rejects.toThrow('enough')
  })
})
