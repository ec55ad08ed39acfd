// Small helpers shared by the benchmark scripts.
import { existsSync } from 'node:fs'
import { createServer } from 'node:net'
import { join } from 'node:path'

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
