import java.io.IOException;
import java.net.InetSocketAddress;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.concurrent.TimeUnit;
import java.util.function.IntSupplier;
import org.apache.beam.model.pipeline.v1.Endpoints;
import org.apache.beam.model.pipeline.v1.RunnerApi;
import org.apache.beam.runners.flink.FlinkJobInvoker;
import org.apache.beam.runners.flink.FlinkJobServerDriver;
import org.apache.beam.runners.jobsubmission.JobInvocation;
import org.apache.beam.runners.jobsubmission.JobServerDriver;
import org.apache.beam.sdk.extensions.gcp.options.GcsOptions;
import org.apache.beam.sdk.fn.server.GrpcContextHeaderAccessorProvider;
import org.apache.beam.sdk.fn.server.ServerFactory;
import org.apache.beam.sdk.io.FileSystems;
import org.apache.beam.sdk.options.PipelineOptions;
import org.apache.beam.sdk.options.PipelineOptionsFactory;
import org.apache.beam.sdk.util.construction.resources.PipelineResourcesDetector;
import org.apache.beam.vendor.grpc.v1p69p0.com.google.protobuf.Struct;
import org.apache.beam.vendor.grpc.v1p69p0.com.google.protobuf.Value;
import org.apache.beam.vendor.grpc.v1p69p0.io.grpc.BindableService;
import org.apache.beam.vendor.grpc.v1p69p0.io.grpc.Server;
import org.apache.beam.vendor.grpc.v1p69p0.io.grpc.ServerInterceptors;
import org.apache.beam.vendor.grpc.v1p69p0.io.grpc.netty.NettyServerBuilder;
import org.apache.beam.vendor.guava.v32_1_2_jre.com.google.common.net.HostAndPort;
import org.apache.beam.vendor.guava.v32_1_2_jre.com.google.common.util.concurrent.ListeningExecutorService;

/**
 * Beam's Flink job server (FlinkJobServerDriver's flags and invoker) with two changes.
 *
 * <p>It listens where {@code --job-host} says. Beam's ServerFactory binds the job and
 * artifact services with {@code NettyServerBuilder.forPort}, on every interface, and uses
 * the host only in the address it advertises; this one binds that host.
 *
 * <p>{@code --no-classpath-staging}: submitting to a remote Flink, Beam's job server ships
 * every jar on its own class path with each job (FlinkJobInvoker detects them with
 * ClassGraph): about 215 MB through the JobManager's blob server, 20 s per submission here.
 * A cluster whose JobManager and TaskManagers run from the same class path (python -m
 * launcher flink-cluster up) holds every class already, so with this flag the job server
 * ships none, through Beam's own option for it
 * (PipelineResourcesOptions.pipelineResourcesDetectorFactoryClass), set on each job unless
 * the submitter set it.
 */
public final class BertstreamFlinkJobServer extends JobServerDriver {
  static final String NO_STAGING = "--no-classpath-staging";
  static final String DETECTOR_OPTION =
      "beam:option:pipeline_resources_detector_factory_class:v1";

  private BertstreamFlinkJobServer(
      FlinkJobServerDriver.FlinkServerConfiguration config, JobInvokerFactory invokers) {
    super(
        config,
        new BoundServerFactory(config::getPort),
        new BoundServerFactory(config::getArtifactPort),
        invokers);
  }

  public static void main(String[] args) throws Exception {
    List<String> rest = new ArrayList<>();
    boolean stage = true;
    for (String arg : args) {
      if (arg.equals(NO_STAGING)) {
        stage = false;
      } else {
        rest.add(arg);
      }
    }
    // As FlinkJobServerDriver.main does.
    PipelineOptions options = PipelineOptionsFactory.create();
    options.as(GcsOptions.class).setGcsUploadBufferSizeBytes(1024 * 1024);
    FileSystems.setDefaultPipelineOptions(options);
    FlinkJobServerDriver.FlinkServerConfiguration config =
        FlinkJobServerDriver.parseArgs(rest.toArray(new String[0]));
    boolean shipJars = stage;
    new BertstreamFlinkJobServer(
            config,
            () -> shipJars ? FlinkJobInvoker.create(config) : new NoStagingInvoker(config))
        .run();
  }

  /** Binds the address a service is created for (Beam's binds every interface). */
  static final class BoundServerFactory extends ServerFactory {
    private final IntSupplier port;

    BoundServerFactory(IntSupplier port) {
      this.port = port;
    }

    @Override
    public Server allocateAddressAndCreate(
        List<BindableService> services, Endpoints.ApiServiceDescriptor.Builder descriptor)
        throws IOException {
      InetSocketAddress address = new InetSocketAddress("127.0.0.1", port.getAsInt());
      Server server = start(services, address);
      descriptor.setUrl("127.0.0.1:" + server.getPort());
      return server;
    }

    @Override
    public Server create(List<BindableService> services, Endpoints.ApiServiceDescriptor at)
        throws IOException {
      HostAndPort hostPort = HostAndPort.fromString(at.getUrl());
      return start(services, new InetSocketAddress(hostPort.getHost(), hostPort.getPort()));
    }

    private static Server start(List<BindableService> services, InetSocketAddress address)
        throws IOException {
      // Beam's settings (ServerFactory.InetSocketAddressServerFactory), on one address.
      NettyServerBuilder builder =
          NettyServerBuilder.forAddress(address)
              .maxInboundMessageSize(Integer.MAX_VALUE)
              .permitKeepAliveTime(20, TimeUnit.SECONDS);
      for (BindableService service : services) {
        builder.addService(
            ServerInterceptors.intercept(service, GrpcContextHeaderAccessorProvider.interceptor()));
      }
      return builder.build().start();
    }
  }

  /** FlinkJobInvoker that ships no class-path jars with a job. */
  static final class NoStagingInvoker extends FlinkJobInvoker {
    NoStagingInvoker(FlinkJobServerDriver.FlinkServerConfiguration config) {
      super(config);
    }

    @Override
    protected JobInvocation invokeWithExecutor(
        RunnerApi.Pipeline pipeline,
        Struct options,
        String retrievalToken,
        ListeningExecutorService executor) {
      Struct withDetector = options;
      if (!options.containsFields(DETECTOR_OPTION)) {
        withDetector =
            options.toBuilder()
                .putFields(
                    DETECTOR_OPTION,
                    Value.newBuilder().setStringValue(NothingToStage.class.getName()).build())
                .build();
      }
      return super.invokeWithExecutor(pipeline, withDetector, retrievalToken, executor);
    }
  }

  /** A PipelineResourcesDetector factory that finds nothing to stage. */
  public static final class NothingToStage implements PipelineResourcesDetector.Factory {
    public static NothingToStage create() {
      return new NothingToStage();
    }

    @Override
    public PipelineResourcesDetector getPipelineResourcesDetector() {
      return new Nothing();
    }
  }

  static final class Nothing implements PipelineResourcesDetector {
    private static final long serialVersionUID = 1L;

    @Override
    public List<String> detect(ClassLoader classLoader) {
      return Collections.emptyList();
    }
  }
}
