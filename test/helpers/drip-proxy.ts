// An HTTP proxy that answers slowly: for requests matching a rule it forwards the request and
// then drips the response body back a few bytes at a time (a slow or congested link), which
// fault-proxy.ts cannot do. Chain it in front of the fault proxy to combine both. The Host
// header is passed through, so registry Locations point back at the front proxy.
import { Agent, type IncomingMessage, type Server, createServer, request } from 'node:http'
import type { AddressInfo, Socket } from 'node:net'

/** Which requests drip, and how slowly. */
export interface DripRule {
  method?: string
  path: RegExp
  /** How many matching requests drip; default every one. */
  count?: number
  /** Bytes written per tick. */
  bytes: number
  /** Milliseconds between ticks. */
  everyMs: number
}

/** A running drip proxy. */
export interface DripProxy {
  host: string
  /** Requests that dripped so far. */
  dripped: number
  setRules(rules: DripRule[]): void
  close(): Promise<void>
}

/** Starts a proxy to `target` (`host:port`) that drips the answers matching `rules`. */
export async function startDripProxy(target: string, rules: DripRule[] = []): Promise<DripProxy> {
  const i = target.lastIndexOf(':')
  const [host, port] = [target.slice(0, i), Number(target.slice(i + 1))]
  const upstream = new Agent({ keepAlive: true })
  let active: { rule: DripRule; left: number }[] = []
  const sockets = new Set<Socket>()
  const state = { dripped: 0 }

  const server: Server = createServer((req, res) => {
    const path = req.url ?? '/'
    const hit = active.find((a) => a.left > 0 && a.rule.path.test(path) && (!a.rule.method || a.rule.method === req.method))
    if (hit) {
      hit.left--
      state.dripped++
    }
    const out = request({ host, port, method: req.method, path, headers: req.headers, agent: upstream }, (up: IncomingMessage) => {
      res.writeHead(up.statusCode ?? 502, up.headers)
      // an upstream cut short (a fault behind this proxy) MUST cut the client's answer short too,
      // or the client would wait for the rest of a body that never comes
      up.on('error', () => res.destroy())
      up.on('close', () => {
        if (!up.complete) res.destroy()
      })
      if (!hit) return void up.pipe(res)
      const { bytes, everyMs } = hit.rule
      let queue = Buffer.alloc(0)
      let ended = false
      let timer: NodeJS.Timeout | undefined
      const tick = () => {
        timer = undefined
        if (res.destroyed) return void up.destroy()
        const piece = queue.subarray(0, bytes)
        queue = queue.subarray(piece.length)
        if (piece.length) res.write(piece)
        if (queue.length) timer = setTimeout(tick, everyMs)
        else if (ended) res.end()
        else up.resume()
      }
      up.on('data', (c: Buffer) => {
        queue = Buffer.concat([queue, c])
        up.pause()
        if (!timer) timer = setTimeout(tick, everyMs)
      })
      up.on('end', () => {
        ended = true
        if (!timer && !queue.length) res.end()
      })
      res.on('close', () => {
        if (timer) clearTimeout(timer)
        up.destroy()
      })
    })
    out.on('error', () => res.socket?.destroy())
    req.pipe(out)
  })
  server.on('connection', (s: Socket) => {
    sockets.add(s)
    s.on('close', () => sockets.delete(s))
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const { port: own } = server.address() as AddressInfo
  const proxy: DripProxy = {
    host: `127.0.0.1:${own}`,
    get dripped() {
      return state.dripped
    },
    setRules: (r) => {
      active = r.map((rule) => ({ rule, left: rule.count ?? Infinity }))
    },
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy()
        upstream.destroy()
        server.close(() => resolve())
      }),
  }
  proxy.setRules(rules)
  return proxy
}
