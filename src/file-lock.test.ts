import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { readdir, utimes, writeFile } from 'node:fs/promises'
import { hostname } from 'node:os'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { describe, expect, it, onTestFinished } from 'vitest'
import { testDir } from '../test/helpers/conformance.js'
import { lockAbandoned, tryFileLock, withFileLock } from './file-lock.js'

const holder = (pid: number, time = Date.now()) => JSON.stringify({ host: hostname(), pid, token: 'theirs', time })

async function deadPid(): Promise<number> {
  const child = spawn(process.execPath, ['-e', ''])
  await once(child, 'exit')
  return child.pid!
}

function liveChild() {
  const child = spawn('sleep', ['30'])
  onTestFinished(() => {
    if (child.exitCode === null) child.kill('SIGKILL')
  })
  return child
}

describe('withFileLock', () => {
  it('serialises callers in one process', async () => {
    const lock = join(await testDir(), 'l')
    let inside = 0
    let most = 0
    await Promise.all(Array.from({ length: 20 }, () => withFileLock(lock, async () => {
      most = Math.max(most, ++inside)
      await sleep(2)
      inside--
    })))
    expect(most).toBe(1)
  })

  it('releases the lock when fn throws, and leaves no file', async () => {
    const dir = await testDir()
    await expect(withFileLock(join(dir, 'l'), async () => {
      throw new Error('boom')
    })).rejects.toThrow('boom')
    expect(await readdir(dir)).toEqual([])
  })

  it('breaks the lock of a holder that died (SIGKILL) at once', async () => {
    const lock = join(await testDir(), 'l')
    await writeFile(lock, holder(await deadPid()))
    const t0 = Date.now()
    expect(await withFileLock(lock, async () => 'got it', { timeoutMs: 5000 })).toBe('got it')
    expect(Date.now() - t0).toBeLessThan(1000)
  })

  it('breaks a torn lock file once it is old, not before', async () => {
    const lock = join(await testDir(), 'l')
    await writeFile(lock, '')
    expect(await tryFileLock(lock)).toBeUndefined()
    const past = new Date(Date.now() - 10_000)
    await utimes(lock, past, past)
    const release = await tryFileLock(lock)
    expect(release).toBeDefined()
    await release!()
  })

  it('waits for a live holder, times out with CACHE_INVALID, and gets the lock once the holder is gone', async () => {
    const lock = join(await testDir(), 'l')
    const child = liveChild()
    await writeFile(lock, holder(child.pid!))
    expect(await lockAbandoned(lock)).toBe(false)
    await expect(withFileLock(lock, async () => 1, { timeoutMs: 200 })).rejects.toMatchObject({ code: 'CACHE_INVALID' })
    const waiting = withFileLock(lock, async () => 2, { timeoutMs: 10_000 })
    await sleep(100)
    child.kill('SIGKILL')
    await once(child, 'exit')
    expect(await waiting).toBe(2)
  })

  it('breaks a lock older than staleMs even if its pid exists', async () => {
    const lock = join(await testDir(), 'l')
    const child = liveChild()
    await writeFile(lock, holder(child.pid!))
    const past = new Date(Date.now() - 60_000)
    await utimes(lock, past, past)
    expect(await withFileLock(lock, async () => 'ok', { staleMs: 30_000, timeoutMs: 2000 })).toBe('ok')
  })

  it('an aborted wait rejects with the signal reason', async () => {
    const lock = join(await testDir(), 'l')
    const child = liveChild()
    await writeFile(lock, holder(child.pid!))
    const reason = new Error('stop')
    await expect(withFileLock(lock, async () => 1, { signal: AbortSignal.timeout(50) })).rejects.toMatchObject({ name: 'TimeoutError' })
    const ac = new AbortController()
    setTimeout(() => ac.abort(reason), 30)
    await expect(withFileLock(lock, async () => 1, { signal: ac.signal })).rejects.toBe(reason)
  })
})
