// bin/blobcache and the CLI's startup snapshot (dist/cli.blob, built by `npm run build`):
// - the launcher starts Node from the snapshot when it was built by the `node` on PATH, and
//   dist/cli.js otherwise (DEBUG set, no marker, another node, a node newer than the snapshot);
// - from the snapshot the CLI does what dist/cli.js does: the same output and exit codes, the
//   lazily loaded parts (zlib, zstd-napi, worker threads, cli-progress) included;
// - a package directory moved after the build still finds its dependencies;
// - registry commands (node:http and node:https are loaded at run time) against the real
//   docker-registry, plain HTTP with basic auth and HTTPS with a self-signed certificate.
import { type ChildProcess, spawn } from 'node:child_process'
import { cpSync, existsSync, mkdirSync, readFileSync, symlinkSync, utimesSync, writeFileSync } from 'node:fs'
import { readFile, readdir } from 'node:fs/promises'
import { join, resolve } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { digestOf } from '../../src/digest.js'
import { writeSampleImage } from '../../src/sample-image.js'
import { parseImageName } from '../../src/transports/index.js'
import { CLI_JS, LAUNCHER, SNAPSHOT } from '../helpers/built-cli.js'
import { testDir } from '../helpers/conformance.js'
import { peer } from '../helpers/peers.js'
import { type TestRegistry, startRegistry } from '../helpers/registry.js'
import { writeRandomImage } from '../helpers/random-image.js'

const ROOT = resolve(__dirname, '../..')
const built = existsSync(join(ROOT, 'dist', 'cli-snapshot.cjs'))
const registryBin = peer('docker-registry')
peer('htpasswd')

interface Run {
  code: number | null
  stdout: string
  stderr: string
  /** The command the launcher executed (from `sh -x`). */
  exec: string
  /** Every line `sh -x` traced. */
  trace: string[]
}

function collect(child: ChildProcess): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((res, rej) => {
    let stdout = ''
    let stderr = ''
    child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()))
    child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()))
    child.on('error', rej)
    child.on('close', (code) => res({ code, stdout, stderr }))
  })
}

/** Runs the launcher under `sh -x`, which shows the command it executes; env without DEBUG. */
async function launch(launcher: string, args: string[], env: Record<string, string> = {}): Promise<Run> {
  const { DEBUG: _d, NODE_OPTIONS: _n, BLOBCACHE_NO_SNAPSHOT: _b, UV_THREADPOOL_SIZE: _u, ...inherited } = process.env
  const r = await collect(spawn('sh', ['-x', launcher, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...inherited, ...env } }))
  const lines = r.stderr.split('\n')
  const exec = lines.find((l) => l.startsWith('+ exec ')) ?? ''
  const stderr = lines.filter((l) => !l.startsWith('+ ')).join('\n')
  return { ...r, stderr, exec, trace: lines.filter((l) => l.startsWith('+ ')) }
}

/** Runs dist/cli.js directly. */
function plain(args: string[], extra: Record<string, string> = {}): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const { DEBUG: _d, ...env } = process.env
  return collect(spawn(process.execPath, [CLI_JS, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...env, ...extra } }))
}

describe.skipIf(!built)('bin/blobcache and the startup snapshot', () => {
  it('npm run build made the snapshot for this node, and the launcher starts from it', async () => {
    expect(existsSync(SNAPSHOT)).toBe(true)
    const [path, version] = readFileSync(`${SNAPSHOT}.node`, 'utf8').split('\n')
    expect(version).toBe(process.version)
    expect(existsSync(path)).toBe(true)
    const r = await launch(LAUNCHER, ['--version'])
    expect(r.exec).toMatch(/ --snapshot-blob \S+\/dist\/cli\.blob -- --version$/)
    // libuv's pool gets 8 threads unless the caller chose
    expect(r.trace).toContain('+ export UV_THREADPOOL_SIZE=8')
    expect((await launch(LAUNCHER, ['--version'], { UV_THREADPOOL_SIZE: '3' })).trace).toContain('+ export UV_THREADPOOL_SIZE=3')
    expect(r.code).toBe(0)
    const pkg = JSON.parse(await readFile(join(ROOT, 'package.json'), 'utf8'))
    expect(r.stdout.trim()).toBe(pkg.version)
    // started by hand, with the snapshot named relative to the working directory
    const { DEBUG: _d, ...env } = process.env
    const byHand = await collect(spawn(process.execPath, ['--snapshot-blob', 'dist/cli.blob', '--', '--version'], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'], env }))
    expect(byHand).toEqual({ code: 0, stdout: `${pkg.version}\n`, stderr: '' })
  })

  it('from the snapshot: the same help, usage errors and failures as dist/cli.js', async () => {
    for (const args of [['--help'], ['copy', '--help'], ['image-cache', '--help'], ['copy', 'a'], ['copy', 'nope', 'dir:/x'], ['copy', 'oci:/nonexistent-blobcache:x', 'dir:/tmp/x'], ['frobnicate']]) {
      const [a, b] = await Promise.all([launch(LAUNCHER, args), plain(args)])
      expect(a.exec).toContain('--snapshot-blob')
      expect({ args, code: a.code, stdout: a.stdout, stderr: a.stderr }).toEqual({ args, code: b.code, stdout: b.stdout, stderr: b.stderr })
    }
  })

  it('from the snapshot: a cold blob-cache copy (gunzip, direct writes), a zstd recompression and a warm copy give the bytes dist/cli.js gives', async () => {
    const root = await testDir()
    await writeRandomImage(parseImageName(`oci:${root}/src:latest`), { layers: 2, layerSize: 6 << 20, compression: 'gzip' })
    const outputs: Record<string, Record<string, string>> = {}
    const runs = [
      ['snapshot', (a: string[], env?: Record<string, string>) => launch(LAUNCHER, a, env)],
      ['plain', plain],
    ] as const
    for (const [name, run] of runs) {
      const cache = join(root, `cache-${name}`)
      const zstd = await run(['copy', '-q', '--dest-compress-format', 'zstd', `oci:${root}/src:latest`, `oci:${root}/zstd-${name}:x`])
      expect(zstd.code, zstd.stderr).toBe(0)
      // BLOBCACHE_DIRECT_IO=1: a large cache file that cannot be written with O_DIRECT is a cache error
      const cold = await run(['copy', '-q', '--json', '--blob-cache', cache, `oci:${root}/src:latest`, `dir:${root}/cold-${name}`], { BLOBCACHE_DIRECT_IO: '1' })
      expect(cold.code, cold.stderr).toBe(0)
      expect(JSON.parse(cold.stdout).cache, name).toMatchObject({ errors: 0, misses: 4 })
      const warm = await run(['copy', '-q', '--json', '--blob-cache', cache, `oci:${root}/src:latest`, `dir:${root}/warm-${name}`])
      expect(warm.code, warm.stderr).toBe(0)
      expect(JSON.parse(warm.stdout).cache.hits).toBeGreaterThan(0)
      outputs[name] = {
        zstd: (await readFile(join(root, `zstd-${name}`, 'index.json'), 'utf8')),
        cold: (await readFile(join(root, `cold-${name}`, 'manifest.json'), 'utf8')),
        cache: (await readdir(cache)).sort().join(' '),
      }
      // every cache entry hashes to its name (the decompressed forms were made and verified)
      for (const f of await readdir(cache)) {
        if (/^sha256:[0-9a-f]{64}(\.config)?$/.test(f)) expect(digestOf(await readFile(join(cache, f)))).toBe(f.replace('.config', ''))
      }
    }
    expect(outputs.snapshot).toEqual(outputs.plain)
    expect(outputs.snapshot.cache.split(' ').filter((f) => f.endsWith('.decompressed'))).toHaveLength(2)
  })

  it('DEBUG, NODE_OPTIONS and BLOBCACHE_NO_SNAPSHOT start dist/cli.js; debug output still works', async () => {
    const root = await testDir()
    await writeSampleImage(parseImageName(`oci:${root}/src:latest`))
    const d = await launch(LAUNCHER, ['copy', '-q', `oci:${root}/src:latest`, `dir:${root}/out`], { DEBUG: 'blobcache:copy' })
    expect(d.exec).toMatch(/dist\/cli\.js copy /)
    expect(d.code).toBe(0)
    expect(d.stderr).toMatch(/blobcache:copy .*committed/)
    for (const env of [{ NODE_OPTIONS: '--no-warnings' }, { BLOBCACHE_NO_SNAPSHOT: '1' }] as Record<string, string>[]) {
      const r = await launch(LAUNCHER, ['--version'], env)
      expect(r.exec).toMatch(/dist\/cli\.js --version$/)
      expect(r.code).toBe(0)
    }
  })

  it('a snapshot of another node, or older than the node, is not used; a moved package still loads its dependencies', async () => {
    const root = await testDir()
    const copy = join(root, 'pkg')
    mkdirSync(join(copy, 'bin'), { recursive: true })
    cpSync(LAUNCHER, join(copy, 'bin', 'blobcache'))
    cpSync(join(ROOT, 'dist'), join(copy, 'dist'), { recursive: true })
    symlinkSync(join(ROOT, 'node_modules'), join(copy, 'node_modules'))
    const launcher = join(copy, 'bin', 'blobcache')
    // moved: the snapshot was built at another path, and zstd-napi is found from the new one
    await writeSampleImage(parseImageName(`oci:${root}/src:latest`))
    const moved = await launch(launcher, ['copy', '-q', '--dest-compress-format', 'zstd', `oci:${root}/src:latest`, `oci:${root}/z:x`])
    expect(moved.exec).toContain(`--snapshot-blob ${copy}/dist/cli.blob`)
    expect(moved.code, moved.stderr).toBe(0)
    expect(await readFile(join(root, 'z', 'index.json'), 'utf8')).toContain('"manifests"')
    // a launcher started through a symbolic link (npm's bin link) finds its package
    symlinkSync(launcher, join(root, 'blobcache'))
    const linked = await launch(join(root, 'blobcache'), ['--version'])
    expect(linked.exec).toContain(`--snapshot-blob ${copy}/dist/cli.blob`)
    expect(linked.code).toBe(0)
    // another node
    writeFileSync(join(copy, 'dist', 'cli.blob.node'), `/opt/other/node\n${process.version}\n`)
    expect((await launch(launcher, ['--version'])).exec).toMatch(/dist\/cli\.js --version$/)
    // a node newer than the snapshot (upgraded since the build)
    writeFileSync(join(copy, 'dist', 'cli.blob.node'), readFileSync(`${SNAPSHOT}.node`))
    expect((await launch(launcher, ['--version'])).exec).toContain('--snapshot-blob')
    utimesSync(join(copy, 'dist', 'cli.blob'), new Date(0), new Date(0))
    const old = await launch(launcher, ['--version'])
    expect(old.exec).toMatch(/dist\/cli\.js --version$/)
    expect(old.code).toBe(0)
  })
})

describe.skipIf(!built || !registryBin)('bin/blobcache from the snapshot against the real registry', () => {
  let plainHttp: TestRegistry
  let tls: TestRegistry
  beforeAll(async () => {
    ;[plainHttp, tls] = await Promise.all([
      startRegistry({ auth: 'htpasswd', users: { alice: 'wonderland' } }),
      startRegistry({ tls: true }),
    ])
  })
  afterAll(async () => {
    await Promise.all([plainHttp?.stop(), tls?.stop()])
  })

  it('pushes, inspects, pulls and image-cache pulls over HTTP (basic auth) and HTTPS, keeping the manifest digest', async () => {
    const root = await testDir()
    const sample = await writeRandomImage(parseImageName(`oci:${root}/src:latest`), { layers: 2, layerSize: 5 << 20 })
    const want = sample.manifestDigest
    for (const [registry, flags] of [
      [plainHttp, ['--tls-verify=false', '--creds', 'alice:wonderland']],
      [tls, ['--tls-verify=false']],
    ] as const) {
      const remote = `docker://${registry.host}/snap/app:v1`
      const dest = flags.map((f) => f.replace('--', '--dest-'))
      const src = flags.map((f) => f.replace('--', '--src-'))
      const push = await launch(LAUNCHER, ['copy', '-q', '--json', ...dest, `oci:${root}/src:latest`, remote])
      expect(push.exec).toContain('--snapshot-blob')
      expect(push.code, push.stderr).toBe(0)
      expect(JSON.parse(push.stdout).manifestDigest).toBe(want)
      const inspect = await launch(LAUNCHER, ['inspect', ...flags, remote])
      expect(inspect.code, inspect.stderr).toBe(0)
      expect(JSON.parse(inspect.stdout).Digest).toBe(want)
      const out = join(root, `pulled-${registry.port}`)
      const pull = await launch(LAUNCHER, ['copy', '-q', ...src, remote, `oci:${out}:v1`])
      expect(pull.code, pull.stderr).toBe(0)
      const index = JSON.parse(await readFile(join(out, 'index.json'), 'utf8'))
      expect(index.manifests[0].digest).toBe(want)
      const cache = join(root, `images-${registry.port}`)
      const ic = await launch(LAUNCHER, ['image-cache', '--cache', cache, 'pull', ...flags, remote.slice('docker://'.length)])
      expect(ic.code, ic.stderr).toBe(0)
      for (const layer of sample.layers) {
        expect(digestOf(await readFile(join(cache, 'blobs', 'sha256', layer.digest.slice(7))))).toBe(layer.digest)
      }
    }
  })

  it('trusts NODE_EXTRA_CA_CERTS, read only when a server is verified, from the snapshot and from dist/cli.js', async () => {
    const root = await testDir()
    const sample = await writeRandomImage(parseImageName(`oci:${root}/src:latest`), { layers: 1, layerSize: 1 << 20 })
    const remote = `docker://${tls.host}/trust/app:v1`
    const push = await launch(LAUNCHER, ['copy', '-q', '--dest-tls-verify=false', `oci:${root}/src:latest`, remote])
    expect(push.code, push.stderr).toBe(0)
    // the launcher moves the variable: Node itself never sees it (no start-up cost)
    const traced = await launch(LAUNCHER, ['--version'], { NODE_EXTRA_CA_CERTS: tls.certPath! })
    expect(traced.trace).toContain('+ unset NODE_EXTRA_CA_CERTS')
    expect(traced.trace).toContain(`+ export BLOBCACHE_EXTRA_CA_CERTS=${tls.certPath}`)
    // a bundle like Debian's, the registry's certificate after a few hundred others
    const system = '/etc/ssl/certs/ca-certificates.crt'
    const bundle = join(root, 'bundle.crt')
    writeFileSync(bundle, (existsSync(system) ? readFileSync(system, 'latin1') : '') + readFileSync(tls.certPath!, 'latin1'))
    for (const env of [{}, { BLOBCACHE_NO_SNAPSHOT: '1' }] as Record<string, string>[]) {
      const refused = await launch(LAUNCHER, ['inspect', remote], env)
      expect(refused.code).toBe(1)
      expect(refused.stderr).toMatch(/certificate/)
      for (const file of [tls.certPath!, bundle]) {
        const trusted = await launch(LAUNCHER, ['inspect', remote], { ...env, NODE_EXTRA_CA_CERTS: file })
        expect(trusted.code, trusted.stderr).toBe(0)
        expect(JSON.parse(trusted.stdout).Digest).toBe(sample.manifestDigest)
      }
      const missing = await launch(LAUNCHER, ['inspect', remote], { ...env, NODE_EXTRA_CA_CERTS: join(root, 'nope.crt') })
      expect(missing.code).toBe(1)
      expect(missing.stderr).toMatch(/Warning: Ignoring extra certs from `.*nope\.crt`, load failed: ENOENT/)
      expect(missing.stderr).toMatch(/certificate/)
      // a command that does not verify anything does not read the file
      const loose = await launch(LAUNCHER, ['inspect', '--tls-verify=false', remote], { ...env, NODE_EXTRA_CA_CERTS: join(root, 'nope.crt') })
      expect(loose.code, loose.stderr).toBe(0)
      expect(loose.stderr).not.toMatch(/Ignoring extra certs/)
    }
  })
})
