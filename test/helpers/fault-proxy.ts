// An HTTP proxy on 127.0.0.1 that sits in front of a test registry and injects faults into the
// requests matching a rule: a connection dropped after N body bytes, a reset before any answer,
// an error status (500, 429 with Retry-After, …), a delay, or a redirect. Without a matching
// rule it passes requests through unchanged (the Host header too, so the registry's upload
// Locations point back at the proxy), and it records every request for counting.
import { Agent, type IncomingMessage, type Server, type ServerResponse, createServer, request } from 'node:http'
import type { AddressInfo, Socket } from 'node:net'

/** What to do to a matching request. */
export type Fault =
  /** Forward, then close the connection after exactly `afterBytes` bytes of the response body (0: lose the answer). */
  | { kind: 'drop'; afterBytes: number }
  /** Close the connection without answering. */
  | { kind: 'reset' }
  /** Answer `status` without forwarding (the request body is read and discarded). */
  | { kind: 'status'; status: number; headers?: Record<string, string>; body?: string }
  /** Wait `ms`, then forward. */
  | { kind: 'delay'; ms: number }
  /** Answer a redirect to `location(path)` (status default 307). */
  | { kind: 'redirect'; location: (path: string) => string; status?: number }
  /** Forward, then replace the answer with what `rewrite` makes of it (the whole body is buffered). */
  | { kind: 'rewrite'; rewrite: (answer: ProxiedAnswer, path: string) => ProxiedAnswer }

/** An answer as {@link Fault} `rewrite` sees and returns it. */
export interface ProxiedAnswer {
  status: number
  headers: Record<string, string | string[] | undefined>
  body: Buffer
}

/** A fault and the requests it applies to. */
export interface FaultRule {
  /** Method to match; default any. */
  method?: string
  /** Matched against the request path with its query. */
  path: RegExp
  /** How many matching requests get the fault; default every one. */
  count?: number
  fault: Fault
}

/** One request seen by the proxy. */
export interface ProxiedRequest {
  method: string
  path: string
  headers: IncomingMessage['headers']
  /** The answer's status (0 when the connection was cut first). */
  status: number
  /** The fault applied, if any. */
  fault?: Fault['kind']
}

/** A running proxy. */
export interface FaultProxy {
  /** `127.0.0.1:<port>`, usable as the registry part of image names. */
  host: string
  port: number
  requests: ProxiedRequest[]
  /** Replaces the rules (and their remaining counts). */
  setRules(rules: FaultRule[]): void
  /** Forgets recorded requests. */
  clear(): void
  close(): Promise<void>
}

/** Starts a fault-injecting proxy forwarding to `target` (`host:port`). */
export async function startFaultProxy(target: string, rules: FaultRule[] = []): Promise<FaultProxy> {
  const [targetHost, targetPort] = [target.slice(0, target.lastIndexOf(':')), Number(target.slice(target.lastIndexOf(':') + 1))]
  const upstream = new Agent({ keepAlive: true })
  let active: { rule: FaultRule; left: number }[] = []
  const setRules = (r: FaultRule[]) => {
    active = r.map((rule) => ({ rule, left: rule.count ?? Infinity }))
  }
  setRules(rules)
  const requests: ProxiedRequest[] = []
  const sockets = new Set<Socket>()

  const forward = (req: IncomingMessage, res: ServerResponse, record: ProxiedRequest, dropAfter?: number, rewrite?: Extract<Fault, { kind: 'rewrite' }>['rewrite']) => {
    const out = request(
      { host: targetHost, port: targetPort, method: req.method, path: req.url, headers: req.headers, agent: upstream },
      (up) => {
        record.status = up.statusCode ?? 0
        if (rewrite) {
          const chunks: Buffer[] = []
          up.on('data', (c: Buffer) => chunks.push(c))
          up.on('end', () => {
            const answer = rewrite({ status: up.statusCode ?? 502, headers: { ...up.headers }, body: Buffer.concat(chunks) }, req.url ?? '/')
            record.status = answer.status
            const headers: ProxiedAnswer['headers'] = { ...answer.headers, 'content-length': String(answer.body.length) }
            delete headers['transfer-encoding']
            res.writeHead(answer.status, headers)
            res.end(answer.body)
          })
          return
        }
        if (dropAfter === undefined) {
          res.writeHead(up.statusCode ?? 502, up.headers)
          up.pipe(res)
          return
        }
        if (dropAfter === 0) {
          // the request was served upstream; its answer is lost
          record.status = 0
          up.destroy()
          res.socket?.destroy()
          return
        }
        res.writeHead(up.statusCode ?? 502, up.headers)
        let sent = 0
        up.on('data', (chunk: Buffer) => {
          if (sent >= dropAfter) return
          const part = chunk.subarray(0, dropAfter - sent)
          sent += part.length
          if (sent < dropAfter) return void res.write(part)
          // flush what was promised, then close the connection mid-body
          up.destroy()
          const socket = res.socket
          res.write(part, () => socket?.end())
        })
        up.on('end', () => res.end())
      },
    )
    out.on('error', () => res.socket?.destroy())
    req.pipe(out)
  }

  const server: Server = createServer((req, res) => {
    const path = req.url ?? '/'
    const record: ProxiedRequest = { method: req.method ?? '', path, headers: req.headers, status: 0 }
    requests.push(record)
    const hit = active.find((a) => a.left > 0 && a.rule.path.test(path) && (!a.rule.method || a.rule.method === req.method))
    if (!hit) return forward(req, res, record)
    hit.left--
    const fault = hit.rule.fault
    record.fault = fault.kind
    switch (fault.kind) {
      case 'drop':
        return forward(req, res, record, fault.afterBytes)
      case 'rewrite':
        return forward(req, res, record, undefined, fault.rewrite)
      case 'delay':
        setTimeout(() => forward(req, res, record), fault.ms)
        return
      case 'reset':
        req.resume()
        req.socket.destroy()
        return
      case 'status':
      case 'redirect':
        req.resume()
        req.on('end', () => {
          if (fault.kind === 'status') {
            record.status = fault.status
            const body = fault.body ?? ''
            res.writeHead(fault.status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), ...fault.headers })
            res.end(body)
          } else {
            record.status = fault.status ?? 307
            res.writeHead(record.status, { location: fault.location(path), 'content-length': 0 }).end()
          }
        })
    }
  })
  server.on('connection', (s: Socket) => {
    sockets.add(s)
    s.on('close', () => sockets.delete(s))
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as AddressInfo
  return {
    host: `127.0.0.1:${port}`,
    port,
    requests,
    setRules,
    clear: () => {
      requests.length = 0
    },
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy()
        upstream.destroy()
        server.close(() => resolve())
      }),
  }
}
