// Small helpers shared by the benchmark scripts.
import { spawn } from 'node:child_process'
import { existsSync } from 'node:fs'
import { rm, writeFile } from 'node:fs/promises'
import { request } from 'node:http'
import { createServer } from 'node:net'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'

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
