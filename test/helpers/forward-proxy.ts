// A forward proxy on 127.0.0.1 for the proxy tests, the kind HTTP_PROXY and HTTPS_PROXY name:
// absolute-form requests (`GET http://host:port/path`) are forwarded, and CONNECT opens a TCP
// tunnel. Host names are looked up in `hosts` (the proxy's own "DNS"; anything else fails), so
// a registry on 127.0.0.1 can be reached under a name the client cannot resolve itself, which
// shows that the bytes went through the proxy. Every request is logged; with `credentials` a
// request without the right Proxy-Authorization gets 407.
import { type IncomingMessage, type Server, type ServerResponse, createServer, request } from 'node:http'
import { createServer as createTlsServer } from 'node:https'
import { type AddressInfo, type Socket, connect } from 'node:net'

export interface ForwardProxyOptions {
  /** Names the proxy resolves, to IPv4 addresses. */
  hosts: Record<string, string>
  /** `user:password` a request must carry (Basic), or none. */
  credentials?: string
  /** Serve the proxy itself over TLS (an `https://` proxy) with this certificate and key (PEM). */
  tls?: { cert: string; key: string }
}

export interface ForwardProxy {
  /** `http://127.0.0.1:<port>` (`https://` with `tls`) */
  url: string
  /** `CONNECT host:port` and `METHOD absolute-url` lines, in order. */
  log: string[]
  close(): Promise<void>
}

export async function startForwardProxy(opts: ForwardProxyOptions): Promise<ForwardProxy> {
  const log: string[] = []
  const sockets = new Set<Socket>()
  const allowed = (req: IncomingMessage) =>
    !opts.credentials || req.headers['proxy-authorization'] === `Basic ${Buffer.from(opts.credentials).toString('base64')}`
  const resolve = (host: string) => opts.hosts[host.toLowerCase()]

  const handler = (req: IncomingMessage, res: ServerResponse) => {
    log.push(`${req.method} ${req.url}`)
    if (!allowed(req)) {
      res.writeHead(407, { 'proxy-authenticate': 'Basic realm="test proxy"' }).end()
      return
    }
    let target: URL
    try {
      target = new URL(req.url ?? '')
    } catch {
      res.writeHead(400).end('absolute-form request expected')
      return
    }
    const address = resolve(target.hostname)
    if (!address || target.protocol !== 'http:') {
      res.writeHead(502).end(`cannot reach ${target.host}`)
      return
    }
    const headers = { ...req.headers }
    delete headers['proxy-authorization']
    delete headers['proxy-connection']
    const upstream = request({ host: address, port: target.port || 80, method: req.method, path: `${target.pathname}${target.search}`, headers }, (answer) => {
      res.writeHead(answer.statusCode ?? 502, answer.headers)
      answer.pipe(res)
    })
    upstream.on('error', () => res.destroy())
    req.pipe(upstream)
  }
  const server: Server = opts.tls ? createTlsServer({ cert: opts.tls.cert, key: opts.tls.key }, handler) : createServer(handler)

  server.on('connect', (req: IncomingMessage, client: Socket, head: Buffer) => {
    log.push(`CONNECT ${req.url}`)
    sockets.add(client)
    client.on('close', () => sockets.delete(client))
    client.on('error', () => {})
    if (!allowed(req)) {
      client.end('HTTP/1.1 407 Proxy Authentication Required\r\nproxy-authenticate: Basic realm="test proxy"\r\ncontent-length: 0\r\n\r\n')
      return
    }
    const [host, port] = (req.url ?? '').split(':')
    const address = resolve(host)
    if (!address) {
      client.end('HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n')
      return
    }
    const upstream = connect(Number(port), address, () => {
      client.write('HTTP/1.1 200 Connection Established\r\n\r\n')
      if (head.length > 0) upstream.write(head)
      upstream.pipe(client)
      client.pipe(upstream)
    })
    sockets.add(upstream)
    upstream.on('close', () => {
      sockets.delete(upstream)
      client.destroy()
    })
    upstream.on('error', () => client.destroy())
    client.on('close', () => upstream.destroy())
  })
  server.on('connection', (s: Socket) => {
    sockets.add(s)
    s.on('close', () => sockets.delete(s))
  })

  await new Promise<void>((ok) => server.listen(0, '127.0.0.1', ok))
  const { port } = server.address() as AddressInfo
  return {
    url: `${opts.tls ? 'https' : 'http'}://127.0.0.1:${port}`,
    log,
    close: () =>
      new Promise<void>((ok) => {
        for (const s of sockets) s.destroy()
        server.close(() => ok())
      }),
  }
}
