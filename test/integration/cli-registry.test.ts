// The CLI against the real registry: docker:// names, skopeo's registry flags (creds, authfile,
// tls-verify) on copy and inspect, and a push/pull round trip that keeps the manifest digest.
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it, onTestFinished } from 'vitest'
import { digestOf } from '../../src/digest.js'
import { writeSampleImage } from '../../src/sample-image.js'
import { parseImageName } from '../../src/transports/index.js'
import { cli } from '../helpers/cli.js'
import { peer } from '../helpers/peers.js'
import { type TestRegistry, startRegistry } from '../helpers/registry.js'

const registryBin = peer('docker-registry')
peer('htpasswd')

async function tempDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'blobcache-cli-registry-'))
  onTestFinished(() => rm(dir, { recursive: true, force: true }))
  return dir
}

describe.skipIf(!registryBin)('blobcache CLI with docker://', () => {
  let registry: TestRegistry
  beforeAll(async () => {
    registry = await startRegistry({ auth: 'htpasswd', users: { alice: 'wonderland' } })
  })
  afterAll(async () => {
    await registry?.stop()
  })

  it('pushes with --dest-creds, inspects and pulls back with the same manifest digest', async () => {
    const dir = await tempDir()
    const sample = await writeSampleImage(parseImageName(`oci:${dir}/src:latest`))
    const remote = `docker://${registry.host}/cli/sample:v1`

    const push = await cli(['copy', '-q', '--json', '--dest-tls-verify=false', '--dest-creds', 'alice:wonderland', `oci:${dir}/src:latest`, remote])
    expect(push.stderr).toBe('')
    expect(push.code).toBe(0)
    expect(JSON.parse(push.stdout).manifestDigest).toBe(sample.digest)

    const raw = await cli(['inspect', '--raw', '--tls-verify=false', '--creds', 'alice:wonderland', remote])
    expect(raw.code).toBe(0)
    expect(digestOf(raw.out.bytes)).toBe(sample.digest)

    const pull = await cli(['copy', '-q', '--src-tls-verify=false', '--src-creds', 'alice:wonderland', remote, `oci:${dir}/back:v1`])
    expect(pull.code).toBe(0)
    const back = await cli(['inspect', '--raw', `oci:${dir}/back:v1`])
    expect(digestOf(back.out.bytes)).toBe(sample.digest)
  })

  it('reads credentials from --authfile', async () => {
    const dir = await tempDir()
    await writeSampleImage(parseImageName(`oci:${dir}/src:latest`))
    const authfile = join(dir, 'auth.json')
    const auth = Buffer.from('alice:wonderland').toString('base64')
    await writeFile(authfile, JSON.stringify({ auths: { [registry.host]: { auth } } }))
    const push = await cli(['copy', '-q', '--dest-tls-verify=false', '--authfile', authfile, `oci:${dir}/src:latest`, `docker://${registry.host}/cli/authfile:v1`])
    expect(push.stderr).toBe('')
    expect(push.code).toBe(0)
  })

  it('fails with exit 1 and one line naming the image when credentials are wrong', async () => {
    const dir = await tempDir()
    await writeSampleImage(parseImageName(`oci:${dir}/src:latest`))
    const remote = `docker://${registry.host}/cli/denied:v1`
    const run = await cli(['copy', '-q', '--dest-tls-verify=false', '--dest-creds', 'alice:wrong', `oci:${dir}/src:latest`, remote])
    expect(run.code).toBe(1)
    const lines = run.stderr.trim().split('\n')
    expect(lines).toHaveLength(1)
    expect(lines[0]).toContain(remote)
  })

  it('refuses a plain-HTTP registry unless TLS verification is turned off', async () => {
    const run = await cli(['inspect', '--creds', 'alice:wonderland', `docker://${registry.host}/cli/sample:v1`])
    expect(run.code).toBe(1)
  })

  it('rejects malformed registry flags as usage errors', async () => {
    expect((await cli(['copy', '--src-tls-verify=maybe', 'oci:/a', 'oci:/b'])).code).toBe(2)
    expect((await cli(['copy', '--dest-creds', 'nocolon', 'oci:/a', 'oci:/b'])).code).toBe(2)
    expect((await cli(['copy', '--retry-times', 'two', 'oci:/a', 'oci:/b'])).code).toBe(2)
    expect((await cli(['copy', '--src-creds', 'a:b', '--src-no-creds', 'oci:/a', 'oci:/b'])).code).toBe(2)
    expect((await cli(['copy', '--dest-creds', 'a:b', '--dest-registry-token', 't', 'oci:/a', 'oci:/b'])).code).toBe(2)
    expect((await cli(['inspect', '--no-creds', '--registry-token', 't', 'oci:/a'])).code).toBe(2)
    expect((await cli(['copy', '--retry-delay', 'soon', 'oci:/a', 'oci:/b'])).code).toBe(2)
  })

  it('--no-creds reads no auth file: the registry then refuses', async () => {
    const dir = await tempDir()
    const authfile = join(dir, 'auth.json')
    await writeFile(authfile, JSON.stringify({ auths: { [registry.host]: { auth: Buffer.from('alice:wonderland').toString('base64') } } }))
    await writeSampleImage(parseImageName(`oci:${dir}/src:latest`))
    const remote = `docker://${registry.host}/cli/anon:v1`
    expect((await cli(['copy', '-q', '--dest-tls-verify=false', '--authfile', authfile, `oci:${dir}/src:latest`, remote])).code).toBe(0)
    expect((await cli(['inspect', '--tls-verify=false', '--authfile', authfile, remote])).code).toBe(0)
    const anon = await cli(['inspect', '--tls-verify=false', '--authfile', authfile, '--no-creds', remote])
    expect(anon.code).toBe(1)
    expect(anon.stderr).toMatch(/HTTP 401|UNAUTHORIZED/)
  })

  it('a re-push of what the tag already names says so and writes nothing; --rewrite-existing writes it again', async () => {
    const dir = await tempDir()
    const sample = await writeSampleImage(parseImageName(`oci:${dir}/src:latest`))
    const args = ['--dest-tls-verify=false', '--dest-creds', 'alice:wonderland', `oci:${dir}/src:latest`, `docker://${registry.host}/cli/again:v1`]
    const first = await cli(['copy', ...args])
    expect(first.code, first.stderr).toBe(0)
    expect(first.stdout).toMatch(/Copying blob sha256:\w+ (done|skipped: already exists)/)
    expect(first.stdout.trim().split('\n').at(-1)).toBe('Writing manifest to image destination')
    const again = await cli(['copy', ...args])
    expect(again.code, again.stderr).toBe(0)
    expect(again.stdout).toBe(`Writing manifest to image destination skipped: ${sample.digest} already exists\n`)
    const json = await cli(['copy', '--json', ...args])
    expect(JSON.parse(json.stdout)).toMatchObject({ manifestDigest: sample.digest, blobs: { copied: 0, reused: 0 }, present: [sample.digest] })
    const forced = await cli(['copy', '--json', '--rewrite-existing', ...args])
    expect(JSON.parse(forced.stdout)).toMatchObject({ manifestDigest: sample.digest, blobs: { copied: 0 }, present: [] })
    expect(JSON.parse(forced.stdout).blobs.reused).toBeGreaterThan(0)
  })

  it('--digestfile holds the manifest digest alone, as skopeo writes it', async () => {
    const dir = await tempDir()
    const sample = await writeSampleImage(parseImageName(`oci:${dir}/src:latest`))
    const file = join(dir, 'digest')
    const push = await cli(['copy', '-q', '--digestfile', file, '--dest-tls-verify=false', '--dest-creds', 'alice:wonderland', `oci:${dir}/src:latest`, `docker://${registry.host}/cli/digestfile:v1`])
    expect(push.code, push.stderr).toBe(0)
    expect(await readFile(file, 'utf8')).toBe(sample.digest)
    // a failed copy leaves the file alone
    const failed = await cli(['copy', '-q', '--digestfile', file, `oci:${dir}/missing:latest`, `oci:${dir}/out:latest`])
    expect(failed.code).toBe(1)
    expect(await readFile(file, 'utf8')).toBe(sample.digest)
  })

  it('--retry-times: a failure that cannot pass is not retried', async () => {
    const dir = await tempDir()
    const missing = await cli(['copy', '-q', '--retry-times', '3', '--retry-delay', '10ms', `oci:${dir}/missing:latest`, `oci:${dir}/out:latest`])
    expect(missing.code).toBe(1)
    expect(missing.stderr).not.toMatch(/attempt 2/)
  })
})
