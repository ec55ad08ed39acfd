// Small helpers shared by the benchmark scripts.
import { spawn } from 'node:child_process'
import { existsSync } from 'node:fs'
import { rm, writeFile } from 'node:fs/promises'
import { request } from 'node:http'
import { createServer } from 'node:net'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { Agent, createServer as createHttpServer, request as httpRequest } from 'node:http'
import { Transform, pipeline } from 'node:stream'

export function freePort() {
  return new Promise((resolvePromise, reject) => {
    const server = createServer()
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const { port: p } = server.address()
      server.close(() => resolvePromise(p))
    })
  })
}

export function which(name) {
  for (const d of (process.env.PATH ?? '').split(':')) if (d && existsSync(join(d, name))) return join(d, name)
  return undefined
}

export function median(xs) {
  const s = [...xs].sort((x, y) => x - y)
  const m = s.length >> 1
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2
}

export function round3(x) {
  return x === null || x === undefined ? null : Math.round(x * 1000) / 1000
}

export function log(msg) {
  console.log(`bench: ${msg}`)
}

export function usage(msg) {
  console.error(`bench: ${msg}`)
  process.exit(2)
}

/** The HTTP status of a GET, 0 when the connection fails. */
export function status(url) {
  return new Promise((resolvePromise) => {
    const req = request(url, (res) => {
      res.resume()
      resolvePromise(res.statusCode)
    })
    req.on('error', () => resolvePromise(0))
    req.end()
  })
}

/**
 * Debian's docker-registry on 127.0.0.1 on a free port, storage under `work`. `start(wipe)`
 * (re)starts it, with empty storage when `wipe`, and waits for GET /v2/; `stop()` stops it by its
 * pid; `killNow()` is for exit handlers.
 */
export async function benchRegistry(work) {
  const host = `127.0.0.1:${await freePort()}`
  const storage = join(work, 'storage')
  const config = join(work, 'config.yml')
  await writeFile(
    config,
    `version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: ${storage}\n` +
      `  delete:\n    enabled: true\nhttp:\n  addr: ${host}\n  secret: blobcache-bench\n`,
  )
  let child
  const stop = async () => {
    if (!child || child.exitCode !== null) return
    const exited = new Promise((r) => child.once('exit', r))
    child.kill('SIGTERM')
    await exited
  }
  return {
    host,
    stop,
    killNow() {
      if (child?.exitCode === null) child.kill('SIGKILL')
    },
    async start(wipe = false) {
      await stop()
      if (wipe) await rm(storage, { recursive: true, force: true })
      child = spawn('docker-registry', ['serve', config], { stdio: 'ignore' })
      for (let i = 0; i < 400; i++) {
        if ((await status(`http://${host}/v2/`)) === 200) return
        await sleep(25)
      }
      throw new Error('docker-registry did not start')
    },
  }
}

/**
 * A token bucket of `bytesPerSecond` (burst `burst` bytes) shared by every stream that takes from
 * it: `take(n)` resolves once `n` bytes may pass. Takers are served in arrival order, so the total
 * rate holds across connections and each gets its turn.
 */
export function tokenBucket(bytesPerSecond, burst = 256 << 10) {
  let tokens = burst
  let last = performance.now()
  let chain = Promise.resolve()
  const refill = () => {
    const now = performance.now()
    tokens = Math.min(burst, tokens + ((now - last) / 1000) * bytesPerSecond)
    last = now
  }
  return {
    take(n) {
      chain = chain.then(async () => {
        refill()
        if (tokens < n) {
          await sleep(Math.ceil(((n - tokens) / bytesPerSecond) * 1000))
          refill()
        }
        tokens -= n
      })
      return chain
    },
  }
}

/**
 * An HTTP proxy on 127.0.0.1 in front of `target` (`host:port`) whose response bodies together
 * pass at no more than `bytesPerSecond` (one token bucket for all connections): a slow link to a
 * remote registry. The Host header is passed through, so the registry's Locations point back at
 * the proxy. `bytes` counts the response body bytes sent, `requests` the requests seen (method
 * and path), for checking what went over the slow link. `close()` ends every connection.
 */
export async function startThrottleProxy(target, bytesPerSecond) {
  const i = target.lastIndexOf(':')
  const [host, port] = [target.slice(0, i), Number(target.slice(i + 1))]
  const upstream = new Agent({ keepAlive: true })
  const bucket = tokenBucket(bytesPerSecond)
  const sockets = new Set()
  const state = { bytes: 0, requests: [] }
  const PIECE = 64 << 10
  const throttle = () =>
    new Transform({
      highWaterMark: 1 << 20,
      transform(chunk, _enc, cb) {
        ;(async () => {
          for (let off = 0; off < chunk.length; off += PIECE) {
            const piece = chunk.subarray(off, off + PIECE)
            await bucket.take(piece.length)
            state.bytes += piece.length
            this.push(piece)
          }
        })().then(() => cb(), cb)
      },
    })
  const server = createHttpServer((req, res) => {
    state.requests.push({ method: req.method, path: req.url })
    const out = httpRequest({ host, port, method: req.method, path: req.url, headers: req.headers, agent: upstream }, (up) => {
      res.writeHead(up.statusCode ?? 502, up.headers)
      pipeline(up, throttle(), res, () => {})
    })
    out.on('error', () => res.socket?.destroy())
    req.pipe(out)
  })
  server.on('connection', (s) => {
    sockets.add(s)
    s.on('close', () => sockets.delete(s))
  })
  await new Promise((r) => server.listen(0, '127.0.0.1', r))
  return {
    host: `127.0.0.1:${server.address().port}`,
    get bytes() {
      return state.bytes
    },
    requests: state.requests,
    reset() {
      state.bytes = 0
      state.requests.length = 0
    },
    close: () =>
      new Promise((r) => {
        for (const s of sockets) s.destroy()
        upstream.destroy()
        server.close(() => r())
      }),
  }
}
