// A TCP server on 127.0.0.1 for tests that speak HTTP by hand (a registry that answers in a
// form of the test's choosing, or not at all). It keeps track of its connections, so that
// closing it ends them too instead of waiting for the client.
import { type Socket, createServer } from 'node:net'

/** A running {@link startTcpServer}. */
export interface TcpServer {
  /** `127.0.0.1:<port>`. */
  host: string
  port: number
  /** Ends every connection and stops listening. */
  close(): Promise<void>
}

/** Listens on a free port of 127.0.0.1 and hands each connection to `onSocket`. */
export async function startTcpServer(onSocket: (socket: Socket) => void): Promise<TcpServer> {
  const sockets = new Set<Socket>()
  const server = createServer((socket) => {
    sockets.add(socket)
    socket.on('close', () => sockets.delete(socket))
    socket.on('error', () => {})
    onSocket(socket)
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as { port: number }
  return {
    host: `127.0.0.1:${port}`,
    port,
    async close() {
      for (const s of sockets) s.destroy()
      await new Promise((resolve) => server.close(resolve))
    },
  }
}
