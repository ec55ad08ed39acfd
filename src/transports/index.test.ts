import { describe, expect, it } from 'vitest'
import { digestOf } from '../digest.js'
import { DirReference } from './dir.js'
import { DockerReference } from './docker.js'
import { imageName, parseImageName, transportByName, transports } from './index.js'
import { OciLayoutReference } from './oci-layout.js'

describe('transport registry', () => {
  it('lists every transport by its containers/image scheme', () => {
    expect(transports.map((t) => t.name)).toEqual(expect.arrayContaining(['dir', 'oci', 'oci-archive', 'docker-archive']))
    expect(new Set(transports.map((t) => t.name)).size).toBe(transports.length)
    for (const t of transports) expect(transportByName(t.name)).toBe(t)
    expect(transportByName('nope')).toBeUndefined()
  })

  it('parses image names with the transport before the first colon', () => {
    const dir = parseImageName('dir:/tmp/img')
    expect(dir).toBeInstanceOf(DirReference)
    expect((dir as DirReference).path).toBe('/tmp/img')
    const oci = parseImageName('oci:/srv/layout:docker.io/library/alpine:3.19')
    expect(oci).toBeInstanceOf(OciLayoutReference)
    expect(oci).toMatchObject({ dir: '/srv/layout', image: 'docker.io/library/alpine:3.19' })
  })

  it.each(['dir:/tmp/img', 'dir:relative/path', 'oci:/srv/layout', 'oci:/srv/layout:latest', 'oci-archive:/tmp/a.tar:v1'])(
    'round-trips %s through imageName',
    (name) => {
      expect(imageName(parseImageName(name))).toBe(name)
    },
  )

  it('parses docker-archive: and docker:// names into their references', () => {
    const archive = parseImageName('docker-archive:/tmp/a.tar:busybox')
    expect(archive.transport.name).toBe('docker-archive')
    expect(archive.dockerReference()?.toString()).toBe('docker.io/library/busybox:latest')
    expect(parseImageName('docker-archive:/tmp/a.tar:@1')).toMatchObject({ path: '/tmp/a.tar', sourceIndex: 1 })
    const reg = parseImageName('docker://localhost:5000/team/app:v1')
    expect(reg).toBeInstanceOf(DockerReference)
    expect(reg).toMatchObject({ registry: 'localhost:5000', repository: 'team/app' })
    expect(parseImageName('docker://alpine').dockerReference()?.toString()).toBe('docker.io/library/alpine:latest')
  })

  it.each([
    'docker-archive:/tmp/a.tar',
    'docker-archive:/tmp/a.tar:docker.io/library/busybox:latest',
    'docker-archive:/tmp/a.tar:example.com:5000/x/y:v2',
    'docker-archive:/tmp/a.tar:@0',
    'docker://docker.io/library/alpine:3.19',
    'docker://127.0.0.1:5000/team/app:v1',
    `docker://reg.example/app@${digestOf('m')}`,
  ])('round-trips %s through imageName', (name) => {
    expect(imageName(parseImageName(name))).toBe(name)
  })

  it('normalises docker names the way containers/image prints them', () => {
    expect(imageName(parseImageName('docker://alpine'))).toBe('docker://docker.io/library/alpine:latest')
    expect(imageName(parseImageName('docker-archive:/tmp/a.tar:busybox'))).toBe('docker-archive:/tmp/a.tar:docker.io/library/busybox:latest')
  })

  it('fails TRANSPORT_UNKNOWN for an unknown scheme and REFERENCE_INVALID for a bad name', () => {
    expect(() => parseImageName('nope:/x')).toThrow(expect.objectContaining({ code: 'TRANSPORT_UNKNOWN' }))
    expect(() => parseImageName('/no/transport')).toThrow(expect.objectContaining({ code: 'REFERENCE_INVALID' }))
    expect(() => parseImageName(':x')).toThrow(expect.objectContaining({ code: 'REFERENCE_INVALID' }))
    expect(() => parseImageName('dir:')).toThrow(expect.objectContaining({ code: 'REFERENCE_INVALID' }))
    expect(() => parseImageName('oci:/x:-bad')).toThrow(expect.objectContaining({ code: 'REFERENCE_INVALID' }))
    expect(() => parseImageName('docker:alpine')).toThrow(expect.objectContaining({ code: 'REFERENCE_INVALID' }))
    expect(() => parseImageName('docker://reg.io/UPPER')).toThrow(expect.objectContaining({ code: 'REFERENCE_INVALID' }))
    expect(() => parseImageName('docker-archive:/a.tar:UPPER')).toThrow(expect.objectContaining({ code: 'REFERENCE_INVALID' }))
  })
})
